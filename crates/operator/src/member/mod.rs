//! The member IO wing: how the hub reaches a member ([`client`]), the member's API for every owned kind ([`kinds`]),
//! what it holds ([`read`]), the one write path ([`write`]), and the watches ([`watches`]) that keep each member's
//! cache ([`cache`]) and trigger reconciles on drift.

pub mod cache;
pub mod client;
pub mod kinds;
pub mod read;
pub mod watches;
pub mod write;
