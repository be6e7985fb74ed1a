-- Argo CD health of a MeshFederation, from the conditions meshfed reports.
local hs = { status = "Progressing", message = "Waiting for meshfed to report on this generation" }
if obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Being deleted: meshfed is cleaning up the members"
  return hs
end
if obj.status == nil or obj.status.observedGeneration ~= obj.metadata.generation then
  return hs
end
local ready, valid
for _, c in ipairs(obj.status.conditions or {}) do
  if c.type == "Ready" then ready = c end
  if c.type == "Valid" then valid = c end
end
if valid ~= nil and valid.status == "False" then
  hs.status = "Degraded"
  hs.message = "Invalid: " .. (valid.message or valid.reason or "")
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
elseif ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
end
return hs
