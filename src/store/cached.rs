//! A write-through copy in memory of every record of one kind (pods,
//! containers): reads (status, list, prefix lookup) never touch the
//! database or decode JSON, and every write goes to the database first, then
//! to the copy. kubelet asks for status and lists far more often than it
//! changes anything, and with a thousand containers a scan that decodes
//! every record per call was the cost of every RPC.
//!
//! Writes are serialized by the copy's lock (the database serializes write
//! transactions anyway), so the copy always holds what was committed last.
//! Records are loaded on first use.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{RwLock, RwLockWriteGuard};

use super::{Kind, Store, StoreError};
use crate::ids::Lookup;

type Records<T> = BTreeMap<String, Arc<T>>;

pub struct Cached<T> {
    store: Store,
    kind: Kind,
    records: RwLock<Option<Records<T>>>,
}

impl<T> Cached<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub fn new(store: Store, kind: Kind) -> Self {
        Cached {
            store,
            kind,
            records: RwLock::new(None),
        }
    }

    /// Every record, in key order.
    pub async fn all(&self) -> Result<Vec<Arc<T>>, StoreError> {
        self.read(|records| records.values().cloned().collect())
            .await
    }

    /// The record `id`, or the only one whose key starts with it.
    pub async fn find(&self, id: &str) -> Result<Lookup<Arc<T>>, StoreError> {
        self.read(|records| {
            if let Some(exact) = records.get(id) {
                return Lookup::Found(exact.clone());
            }
            let mut matches = records
                .range::<str, _>((std::ops::Bound::Included(id), std::ops::Bound::Unbounded))
                .take_while(|(key, _)| key.starts_with(id));
            match (matches.next(), matches.next()) {
                (None, _) => Lookup::NotFound,
                (Some((_, one)), None) => Lookup::Found(one.clone()),
                (Some((a, _)), Some((b, _))) => {
                    let mut ids = vec![a.clone(), b.clone()];
                    ids.extend(matches.map(|(key, _)| key.clone()));
                    Lookup::Ambiguous(ids.join(", "))
                }
            }
        })
        .await
    }

    /// Writes (or replaces) one record.
    pub async fn put(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.write().await?.put(key, value).await
    }

    /// Deletes one record; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.write().await?.delete(key).await
    }

    /// Replaces the copy in memory of a record that exists, without a
    /// commit: for a field that is found again after a restart (a
    /// container's pid, which its monitor also writes to the bundle).
    pub async fn update_in_memory(&self, key: &str, value: &T) {
        if let Some(records) = self.records.write().await.as_mut()
            && let Some(record) = records.get_mut(key)
        {
            *record = Arc::new(value.clone());
        }
    }

    /// Exclusive access: read the records and write some, with nobody
    /// writing in between (a name reservation checks and writes this way).
    pub async fn write(&self) -> Result<CachedWrite<'_, T>, StoreError> {
        let mut guard = self.records.write().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        Ok(CachedWrite { cache: self, guard })
    }

    async fn read<R>(&self, f: impl FnOnce(&Records<T>) -> R) -> Result<R, StoreError> {
        {
            let guard = self.records.read().await;
            if let Some(records) = guard.as_ref() {
                return Ok(f(records));
            }
        }
        let write = self.write().await?;
        Ok(f(write.records()))
    }

    async fn load(&self) -> Result<Records<T>, StoreError> {
        let (store, kind) = (self.store.clone(), self.kind);
        let list = self.blocking(move || store.list::<T>(kind)).await??;
        Ok(list
            .into_iter()
            .map(|(key, value)| (key, Arc::new(value)))
            .collect())
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, StoreError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::Task {
                path: self.store.path().to_path_buf(),
                message: e.to_string(),
            })
    }
}

/// The records under the write lock; see [`Cached::write`].
pub struct CachedWrite<'a, T> {
    cache: &'a Cached<T>,
    guard: RwLockWriteGuard<'a, Option<Records<T>>>,
}

impl<T> CachedWrite<'_, T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub fn records(&self) -> &BTreeMap<String, Arc<T>> {
        self.guard
            .as_ref()
            .expect("a CachedWrite is only made with the records loaded")
    }

    pub async fn put(&mut self, key: &str, value: &T) -> Result<(), StoreError> {
        let (store, kind) = (self.cache.store.clone(), self.cache.kind);
        let (owned_key, owned) = (key.to_string(), value.clone());
        self.cache
            .blocking(move || store.put(kind, &owned_key, &owned))
            .await??;
        if let Some(records) = self.guard.as_mut() {
            records.insert(key.to_string(), Arc::new(value.clone()));
        }
        Ok(())
    }

    pub async fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        let (store, kind) = (self.cache.store.clone(), self.cache.kind);
        let owned_key = key.to_string();
        let existed = self
            .cache
            .blocking(move || store.delete(kind, &owned_key))
            .await??;
        if let Some(records) = self.guard.as_mut() {
            records.remove(key);
        }
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    fn cache() -> (tempfile::TempDir, Store, Cached<Rec>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let cache = Cached::new(store.clone(), Kind::Container);
        (dir, store, cache)
    }

    #[tokio::test]
    async fn writes_go_to_the_database_and_reads_come_from_memory() {
        let (_dir, store, cache) = cache();
        store
            .put(Kind::Container, "abc1", &Rec { n: 1 })
            .expect("seed");
        // Loaded on first use.
        assert_eq!(cache.all().await.expect("all").len(), 1);
        cache.put("abd2", &Rec { n: 2 }).await.expect("put");
        assert_eq!(
            store.get::<Rec>(Kind::Container, "abd2").expect("get"),
            Some(Rec { n: 2 }),
            "written through"
        );
        assert!(matches!(cache.find("abc").await.expect("find"), Lookup::Found(r) if r.n == 1));
        assert!(
            matches!(cache.find("ab").await.expect("find"), Lookup::Ambiguous(ids) if ids == "abc1, abd2")
        );
        assert!(matches!(
            cache.find("x").await.expect("find"),
            Lookup::NotFound
        ));
        assert!(cache.delete("abc1").await.expect("delete"));
        assert!(!cache.delete("abc1").await.expect("delete again"));
        assert_eq!(
            store.get::<Rec>(Kind::Container, "abc1").expect("get"),
            None
        );
        assert!(matches!(cache.find("ab").await.expect("find"), Lookup::Found(r) if r.n == 2));
    }

    #[tokio::test]
    async fn an_exact_id_wins_over_longer_ones_it_prefixes() {
        let (_dir, _store, cache) = cache();
        cache.put("ab", &Rec { n: 1 }).await.expect("put");
        cache.put("abc", &Rec { n: 2 }).await.expect("put");
        assert!(matches!(cache.find("ab").await.expect("find"), Lookup::Found(r) if r.n == 1));
    }
}
