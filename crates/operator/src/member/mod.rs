//! The member IO wing: how the hub reaches a member ([`client`]), the member's API for every owned kind ([`kinds`]),
//! what it holds ([`read`]), the one write path ([`write`]), and the watches ([`watches`]) that keep each member's
//! cache ([`cache`]) and trigger reconciles on drift.

pub mod cache;
pub mod client;
pub mod kinds;
pub mod read;
pub mod watches;
pub mod write;

use std::sync::Arc;

use meshfed_core::plan::Observation;

use self::{cache::MemberCache, client::Member};

/// A member that answered this reconcile: how to reach it, its watch cache, and what was seen there.
pub struct Reached {
    pub member: Member,
    pub cache: Arc<MemberCache>,
    pub seen: Observation,
}
