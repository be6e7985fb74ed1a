#!/usr/bin/env python3
"""The import graph of a crate's top-level modules (from `use crate::...` and `crate::x::` paths, tests and comments
left out) and its import circles: `python3 hack/modgraph.py crates/core/src`."""
import re, sys, os, itertools
src = sys.argv[1]
mods = {}
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith('.rs'): continue
        p = os.path.join(root, f)
        rel = os.path.relpath(p, src)
        top = rel.split('/')[0].removesuffix('.rs')
        if top in ('lib', 'main'): continue
        text = open(p).read()
        # drop test modules roughly: cut at '#[cfg(test)]'
        text = text.split('#[cfg(test)]')[0]
        text = '\n'.join(l for l in text.splitlines() if not l.strip().startswith('//'))
        deps = mods.setdefault(top, set())
        for m in re.finditer(r'use crate::\{([^;]*)\};', text, re.S):
            for name in re.findall(r'(?:^|[\s,{])([a-z_][a-z0-9_]*)(?=::|\s*,|\s*\}|$)', m.group(1)):
                deps.add(name)
        for m in re.finditer(r'crate::([a-z_][a-z0-9_]*)', text):
            deps.add(m.group(1))
for k in mods: mods[k] = {d for d in mods[k] if d in mods and d != k}
for k in sorted(mods): print(f"{k} -> {' '.join(sorted(mods[k]))}")
# cycles via Tarjan SCC
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
def sc(v):
    index[v]=low[v]=i[0]; i[0]+=1; stack.append(v); on.add(v)
    for w in mods[v]:
        if w not in index: sc(w); low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],index[w])
    if low[v]==index[v]:
        comp=[]
        while True:
            w=stack.pop(); on.discard(w); comp.append(w)
            if w==v: break
        if len(comp)>1: sccs.append(comp)
for v in mods:
    if v not in index: sc(v)
print("cycles:", sccs if sccs else "none")
