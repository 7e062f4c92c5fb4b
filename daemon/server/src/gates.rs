//! One holder at a time per key: what makes a retried launch (the same caller, the same
//! `request_id`) wait for the first one instead of racing it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// A key's gate, and how many passages (holding or waiting) there are for it.
type Gate = (Arc<tokio::sync::Mutex<()>>, usize);

/// A gate per key, made when first entered and forgotten when its last holder or waiter goes.
#[derive(Debug)]
pub struct Gates<K> {
    map: Mutex<HashMap<K, Gate>>,
}

impl<K> Default for Gates<K> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

/// Holds the gate of one key; dropping it (also with a cancelled request) lets the next in.
#[derive(Debug)]
pub struct Passage<'a, K: Hash + Eq> {
    gates: &'a Gates<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Clone> Gates<K> {
    /// Waits until nobody else holds `key`'s gate, and holds it.
    pub async fn enter(&self, key: K) -> Passage<'_, K> {
        let gate = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            let (gate, users) = map.entry(key.clone()).or_default();
            *users += 1;
            gate.clone()
        };
        // Counted from here on, so that a request cancelled while it waits is uncounted too.
        let mut passage = Passage {
            gates: self,
            key,
            guard: None,
        };
        passage.guard = Some(gate.lock_owned().await);
        passage
    }

    /// How many keys have a holder or a waiter.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no key has a holder or a waiter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq> Passage<'_, K> {
    /// The key held.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Hash + Eq> Drop for Passage<'_, K> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.gates.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, users)) = map.get_mut(&self.key) {
            *users -= 1;
            if *users == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_key_and_forgotten_after() {
        let gates: Arc<Gates<String>> = Arc::default();
        let first = gates.enter("a".to_owned()).await;
        // Another key is not held up.
        drop(gates.enter("b".to_owned()).await);
        let g = gates.clone();
        let second = tokio::spawn(async move {
            let _p = g.enter("a".to_owned()).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second waits for the first");
        assert_eq!(gates.len(), 1);
        drop(first);
        second.await.unwrap();
        assert!(gates.is_empty(), "no gate is kept once nobody holds it");
        // A holder whose request is cancelled while waiting leaves nothing behind either.
        let held = gates.enter("c".to_owned()).await;
        let g = gates.clone();
        let waiting = tokio::spawn(async move {
            let _p = g.enter("c".to_owned()).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        assert!(gates.is_empty());
    }
}
