//! The on-disk [`Store`], on sled 0.34.
//!
//! All logical trees share one sled keyspace, each key prefixed with its
//! tree's tag byte. That makes every batch a single-tree sled batch or
//! transaction, which sled recovers atomically after a crash, instead of a
//! multi-tree transaction. Every commit is followed by `flush` (fsync)
//! before it returns: the caller is only told "durable" once it is.

use std::path::Path;

use crate::{Batch, Expect, Op, Store, StoreError, Tree};

/// A [`Store`] in a sled database directory.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    path: String,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, recovering from any crash.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.display().to_string();
        let db = sled::Config::new().path(dir).open().map_err(|e| open_error(&path, e))?;
        let store = Self { db, path };
        crate::check_schema(&store, &store.path)?;
        Ok(store)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(backend)
    }
}

fn open_error(path: &str, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::InUse { path: path.to_string() }
        }
        other => StoreError::Backend(format!("opening {path}: {other}")),
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn full_key(tree: Tree, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(tree.tag());
    k.extend_from_slice(key);
    k
}

fn to_sled_batch(batch: &Batch) -> sled::Batch {
    let mut out = sled::Batch::default();
    for op in batch.ops() {
        match op {
            Op::Put { tree, key, value } => out.insert(full_key(*tree, key), value.as_slice()),
            Op::Delete { tree, key } => out.remove(full_key(*tree, key)),
        }
    }
    out
}

impl Store for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(full_key(tree, key)).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<crate::Entry>, StoreError> {
        self.db
            .scan_prefix(full_key(tree, prefix))
            .map(|entry| {
                let (k, v) = entry.map_err(backend)?;
                Ok((k[1..].to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.db.apply_batch(to_sled_batch(batch)).map_err(backend)?;
        self.flush()
    }

    fn commit_if(&self, expect: &[Expect], batch: &Batch) -> Result<bool, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};

        let writes = to_sled_batch(batch);
        let result = self.db.transaction(|tx| {
            for e in expect {
                let current = tx.get(full_key(e.tree, &e.key))?;
                if current.as_deref() != e.value.as_deref() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            tx.apply_batch(&writes)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                self.flush()?;
                Ok(true)
            }
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(backend(e)),
        }
    }
}
