//! The conformance suite: behaviour every [`Store`](crate::Store) backend must show. A backend's
//! tests invoke [`conformance_suite!`](crate::conformance_suite) with a factory of fresh, empty
//! stores; each case becomes its own test.

use std::sync::Arc;

use crate::Store;

/// A fresh, empty store for one case.
pub type Fresh = Arc<dyn Store>;

/// Expands to one `#[tokio::test]` per conformance case. `$factory` is an async expression
/// that yields a fresh, empty `Arc<dyn Store>`.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@cases $factory; );
    };
    (@cases $factory:expr; $($case:ident)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let store = $factory.await;
                $crate::conformance::$case(store).await;
            }
        )*
    };
}

#[allow(dead_code)]
async fn placeholder(_store: Fresh) {}
