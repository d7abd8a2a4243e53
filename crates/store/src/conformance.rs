//! One suite, run against every backend, so the in-memory twin can't drift
//! from the real store.

use mycel_protocol::{Digest, ResultAck, TaskId, Verdict};

use crate::*;

fn suite(store: &dyn Store) {
    // Trees are separate keyspaces.
    let mut b = Batch::new();
    b.put(Tree::Tasks, b"k".to_vec(), b"task".to_vec()).put(Tree::Shards, b"k".to_vec(), b"shard".to_vec());
    store.commit(&b).unwrap();
    assert_eq!(store.get(Tree::Tasks, b"k").unwrap().as_deref(), Some(&b"task"[..]));
    assert_eq!(store.get(Tree::Shards, b"k").unwrap().as_deref(), Some(&b"shard"[..]));
    assert_eq!(store.get(Tree::Results, b"k").unwrap(), None);

    // Later writes in a batch win; deletes apply.
    let mut b = Batch::new();
    b.put(Tree::Peers, b"p".to_vec(), b"1".to_vec()).put(Tree::Peers, b"p".to_vec(), b"2".to_vec());
    b.delete(Tree::Tasks, b"k".to_vec());
    store.commit(&b).unwrap();
    assert_eq!(store.get(Tree::Peers, b"p").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(store.get(Tree::Tasks, b"k").unwrap(), None);

    // Prefix scans stay inside their tree and prefix, in key order.
    let mut b = Batch::new();
    for k in ["a/2", "a/1", "b/1"] {
        b.put(Tree::Results, k.as_bytes().to_vec(), k.as_bytes().to_vec());
    }
    b.put(Tree::Reputation, b"a/0".to_vec(), b"other tree".to_vec());
    store.commit(&b).unwrap();
    let keys: Vec<_> = store.scan_prefix(Tree::Results, b"a/").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![b"a/1".to_vec(), b"a/2".to_vec()]);
    assert_eq!(store.scan_prefix(Tree::Results, b"").unwrap().len(), 3);

    // A transition applies only from the expected state, all or nothing.
    let state = |v: &str| Expect { tree: Tree::Tasks, key: b"t1".to_vec(), value: Some(v.as_bytes().to_vec()) };
    let mut start = Batch::new();
    start.put(Tree::Tasks, b"t1".to_vec(), b"planned".to_vec());
    let absent = Expect { tree: Tree::Tasks, key: b"t1".to_vec(), value: None };
    assert!(store.commit_if(std::slice::from_ref(&absent), &start).unwrap());
    assert!(!store.commit_if(&[absent], &start).unwrap(), "created twice");

    let mut run = Batch::new();
    run.put(Tree::Tasks, b"t1".to_vec(), b"running".to_vec()).put(Tree::Shards, b"t1/0".to_vec(), b"awarded".to_vec());
    assert!(!store.commit_if(&[state("running")], &run).unwrap());
    assert_eq!(store.get(Tree::Shards, b"t1/0").unwrap(), None, "refused transition wrote something");
    assert!(store.commit_if(&[state("planned")], &run).unwrap());
    assert_eq!(store.get(Tree::Tasks, b"t1").unwrap().as_deref(), Some(&b"running"[..]));
    assert_eq!(store.get(Tree::Shards, b"t1/0").unwrap().as_deref(), Some(&b"awarded"[..]));

    // Typed values use the protocol codec; garbage is reported, not skipped.
    let ack = ResultAck { task: TaskId([1; 16]), shard: 2, claim: Digest::of(b"c"), verdict: Verdict::Accepted };
    let mut b = Batch::new();
    b.put_wire(Tree::Results, b"ack".to_vec(), &ack).unwrap();
    b.put(Tree::Results, b"bad".to_vec(), vec![0xff; 3]);
    store.commit(&b).unwrap();
    assert_eq!(store.get_wire::<ResultAck>(Tree::Results, b"ack").unwrap(), Some(ack));
    assert_eq!(store.get_wire::<ResultAck>(Tree::Results, b"none").unwrap(), None);
    assert!(matches!(store.get_wire::<ResultAck>(Tree::Results, b"bad"), Err(StoreError::Corrupt { .. })));
}

#[test]
fn mem_store_conforms() {
    suite(&MemStore::new());
}

#[test]
fn sled_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    suite(&SledStore::open(dir.path()).unwrap());
}

#[test]
fn sled_store_keeps_data_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put(Tree::Tasks, b"t".to_vec(), b"v".to_vec());
        store.commit(&b).unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.get(Tree::Tasks, b"t").unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn second_open_of_the_same_dir_says_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = SledStore::open(dir.path()).unwrap();
    let err = SledStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("another mycel node"), "{err}");
}

#[test]
fn store_from_another_schema_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put(Tree::Meta, SCHEMA_KEY.to_vec(), 99u32.to_le_bytes().to_vec()).put(
            Tree::Tasks,
            b"t".to_vec(),
            b"v".to_vec(),
        );
        store.commit(&b).unwrap();
    }
    let err = SledStore::open(dir.path()).unwrap_err();
    assert!(matches!(&err, StoreError::Schema { found, .. } if found == "99"), "{err}");
    // Refusing did not rewrite it.
    let raw = sled::open(dir.path()).unwrap();
    assert_eq!(
        raw.get([&[Tree::Meta.tag()][..], SCHEMA_KEY].concat()).unwrap().unwrap().as_ref(),
        &99u32.to_le_bytes()
    );
}
