//! Counted slots per key (the commands `exec` runs per agent, the runs per caller's uid): a
//! bound on what one key may hold in aitherd at a time, each slot given back when its guard
//! drops, on every path.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// How many slots each key holds now (keys holding none are not kept).
pub struct Slots<K>(Mutex<HashMap<K, usize>>);

impl<K> Default for Slots<K> {
    fn default() -> Self {
        Slots(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + Hash + Clone> Slots<K> {
    /// A slot for one more of `key`'s, if it holds fewer than `max`; freed when the guard drops.
    pub fn take(self: &Arc<Self>, key: &K, max: usize) -> Option<SlotGuard<K>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_default();
        if *n >= max {
            if *n == 0 {
                m.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(SlotGuard {
            slots: self.clone(),
            key: key.clone(),
        })
    }

    /// Whether no key holds a slot.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

/// One slot, given back on drop.
pub struct SlotGuard<K: Eq + Hash> {
    slots: Arc<Slots<K>>,
    key: K,
}

impl<K: Eq + Hash> Drop for SlotGuard<K> {
    fn drop(&mut self) {
        let mut m = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}
