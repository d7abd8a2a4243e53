//! In-memory [`Store`] for tests and simulations: same semantics as the
//! sled backend, nothing on disk.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::{Batch, Expect, Op, Store, StoreError, Tree};

/// Every tree's entries, keyed by (tree, key).
type Entries = BTreeMap<(Tree, Vec<u8>), Vec<u8>>;

/// A [`Store`] held in memory. Atomic like the real one; "durable" for as
/// long as the value lives.
#[derive(Debug, Default)]
pub struct MemStore {
    trees: Mutex<Entries>,
}

impl MemStore {
    /// An empty store (schema recorded, like a fresh [`crate::SledStore`]).
    pub fn new() -> Self {
        let store = Self::default();
        // Cannot fail in memory.
        let _ = crate::check_schema(&store, "memory");
        store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock can only come from a bug in this
        // file; the map itself is never left half-written (see `apply`).
        self.trees.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn apply(map: &mut Entries, batch: &Batch) {
    for op in batch.ops() {
        match op {
            Op::Put { tree, key, value } => {
                map.insert((*tree, key.clone()), value.clone());
            }
            Op::Delete { tree, key } => {
                map.remove(&(*tree, key.clone()));
            }
        }
    }
}

impl Store for MemStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(&(tree, key.to_vec())).cloned())
    }

    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<crate::Entry>, StoreError> {
        Ok(self
            .lock()
            .range((tree, prefix.to_vec())..)
            .take_while(|((t, k), _)| *t == tree && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        apply(&mut self.lock(), batch);
        Ok(())
    }

    fn commit_if(&self, expect: &[Expect], batch: &Batch) -> Result<bool, StoreError> {
        let mut map = self.lock();
        let holds = expect.iter().all(|e| map.get(&(e.tree, e.key.clone())) == e.value.as_ref());
        if holds {
            apply(&mut map, batch);
        }
        Ok(holds)
    }
}
