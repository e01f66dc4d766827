//! The public types can be shared across threads and tasks, and stores work behind
//! `Arc<dyn SessionStore>`.

mod common;

use std::sync::Arc;

use portable_sessions::{
    session::{Id, Record},
    session_store::Error,
    CachingSessionStore, ExpiredDeletion, MemoryStore, SessionStore,
};

fn assert_send_sync<T: Send + Sync + 'static>() {}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<Id>();
    assert_send_sync::<Record>();
    assert_send_sync::<Error>();
    assert_send_sync::<MemoryStore>();
    assert_send_sync::<CachingSessionStore<MemoryStore, MemoryStore>>();
    assert_send_sync::<Arc<dyn SessionStore>>();
    assert_send_sync::<Arc<dyn ExpiredDeletion>>();
}

#[cfg(not(feature = "sync"))]
#[test]
fn store_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let store = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    let id = Id::default();
    assert_send(&store.load(&id));
    assert_send(&store.delete(&id));
    assert_send(&store.delete_expired());
}

#[maybe_async::maybe_async]
async fn stores_work_as_trait_objects() {
    let memory = MemoryStore::new();
    let stores: Vec<Arc<dyn SessionStore>> = vec![
        Arc::new(memory.clone()),
        Arc::new(CachingSessionStore::new(MemoryStore::new(), memory.clone())),
        // A caching store whose layers are themselves trait objects.
        Arc::new(CachingSessionStore::new(
            Arc::new(MemoryStore::new()) as Arc<dyn SessionStore>,
            Arc::new(memory.clone()) as Arc<dyn SessionStore>,
        )),
    ];
    for store in &stores {
        let mut record = common::live_record(5);
        store.create(&mut record).await.unwrap();
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded, Some(record));
    }
    assert_eq!(memory.len(), 3);
}

tests_in_both_modes!(stores_work_as_trait_objects);
