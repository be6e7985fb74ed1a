//! The meshfed hub controller. `meshfed run` runs [`reconcile::run`]; tests and the demo run it in-process.

pub mod check;
pub mod credential;
pub mod join;
pub mod leader;
pub mod member;
pub mod metrics;
pub mod reconcile;
pub mod remote;
pub mod table;
pub mod trust;

/// What can fail in a reconcile, with a stable category for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the MeshFederation has no namespace")]
    NotNamespaced,
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    #[error("members not cleaned up yet: {0}")]
    CleanupPending(String),
    #[error("keeping the root in the hub: {0}")]
    KeepRoots(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Every category [`Error::metric_label`] gives.
    pub const CATEGORIES: [&'static str; 5] =
        ["not_namespaced", "status", "cleanup_pending", "keep_roots", "finalizer"];

    /// A stable category, for metrics labels: the reconcile's own error where the finalizer wraps one.
    pub fn metric_label(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Self::NotNamespaced => "not_namespaced",
            Self::Status(_) => "status",
            Self::CleanupPending(_) => "cleanup_pending",
            Self::KeepRoots(_) => "keep_roots",
            Self::Finalizer(e) => match &**e {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }
}
