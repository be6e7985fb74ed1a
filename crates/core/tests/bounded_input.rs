//! Member- and user-held YAML costs little whatever it says: kubeconfig Secrets (hub) and remote secrets (members)
//! built for alias amplification ("billion laughs") are refused quickly, with the memory the parse takes measured
//! by a counting allocator. One test in this binary, so that nothing else allocates meanwhile.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::{Duration, Instant},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use meshfed_core::{kubeconfig, remote, yaml};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grew(new_size - layout.size());
        } else {
            CURRENT.fetch_sub(layout.size() - new_size, Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its result, the memory it took at most beyond what was allocated before, and its duration.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let started = Instant::now();
    let out = f();
    (out, PEAK.load(Relaxed).saturating_sub(base), started.elapsed())
}

/// A kubeconfig with a billion-laughs tree under an extra top-level key (which kube's `Kubeconfig` keeps), padded
/// with a comment to `size` bytes. Expanded, the tree has 10^9 strings.
fn laughs(size: usize) -> String {
    let mut doc = String::from(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- {name: c, context: {cluster: k, user: u}}\nclusters:\n- {name: k, cluster: {server: 'https://127.0.0.1:6443'}}\nusers:\n- {name: u, user: {token: s3cr3t-token}}\n",
    );
    doc.push_str(
        "lol0: &l0 [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n",
    );
    for i in 1..9 {
        let p = i - 1;
        doc.push_str(&format!(
            "lol{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"
        ));
    }
    doc.push_str("laughs: [*l8, *l8, *l8, *l8, *l8, *l8, *l8, *l8, *l8, *l8]\n#");
    doc.push_str(&"x".repeat(size.saturating_sub(doc.len() + 1)));
    doc.push('\n');
    doc
}

fn remote_secret(kubeconfig: &str) -> Secret {
    Secret {
        data: Some(BTreeMap::from([("west".into(), ByteString(kubeconfig.as_bytes().to_vec()))])),
        ..Default::default()
    }
}

#[test]
fn amplifying_yaml_is_refused_quickly_in_bounded_memory() {
    const BUDGET: usize = 16 << 20;
    const QUICK: Duration = Duration::from_secs(2);
    let mib = laughs(1 << 20);
    let under_cap = laughs(yaml::MAX_DOCUMENT_BYTES - 1024);
    assert!(mib.len() >= 1 << 20 && under_cap.len() <= yaml::MAX_DOCUMENT_BYTES);

    for (what, doc) in [("1 MiB", &mib), ("just under the cap", &under_cap)] {
        // A kubeconfig Secret in the hub.
        let (result, memory, took) = measured(|| kubeconfig::check(doc));
        let err = result.expect_err(what);
        assert_eq!(err.reason(), "KubeconfigInvalid", "{what}");
        let text = err.to_string();
        assert!(!text.contains("s3cr3t") && !text.contains("lol"), "{what}: {text}");
        assert!(memory < BUDGET, "{what}: the kubeconfig check took {memory} bytes");
        assert!(took < QUICK, "{what}: the kubeconfig check took {took:?}");

        // A remote secret read back from a member.
        let secret = remote_secret(doc);
        let (token, memory, took) = measured(|| remote::token_in_remote_secret(&secret, "west"));
        assert!(token.is_none(), "{what}");
        assert!(memory < BUDGET, "{what}: reading the remote secret took {memory} bytes");
        assert!(took < QUICK, "{what}: reading the remote secret took {took:?}");
    }

    // The same document without its laughs is read: what is refused is the amplification, not the size.
    let plain = laughs(0);
    let plain = plain.split("lol0:").next().unwrap();
    let (result, _, _) = measured(|| kubeconfig::check(plain));
    assert_eq!(result.unwrap().1, "https://127.0.0.1:6443");
    assert_eq!(remote::token_in_remote_secret(&remote_secret(plain), "west").unwrap().expose(), "s3cr3t-token");
}
