//! The cache of running executions' in-memory state, bounded: when it holds more runs than its
//! capacity, the runs touched least recently and not in use are dropped. Their state is durable,
//! so the next event for one of them reloads it from its history.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::Slot;

pub(crate) struct ExecCache {
    map: HashMap<String, Slot>,
    /// Run ids in the order they were inserted; may hold ids already removed.
    order: VecDeque<String>,
    capacity: usize,
}

impl ExecCache {
    pub fn new(capacity: usize) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    pub fn get(&self, run_id: &str) -> Option<&Slot> {
        self.map.get(run_id)
    }

    pub fn insert(&mut self, run_id: String, slot: Slot) {
        self.order.push_back(run_id.clone());
        self.map.insert(run_id, slot);
        self.evict();
    }

    pub fn remove(&mut self, run_id: &str) {
        self.map.remove(run_id);
    }

    /// Removes `run_id` only if it still maps to `slot`.
    pub fn remove_if(&mut self, run_id: &str, slot: &Slot) {
        if self.map.get(run_id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            self.map.remove(run_id);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn evict(&mut self) {
        // Each pass looks at a bounded number of candidates so an insert stays cheap.
        let mut budget = 64;
        while self.map.len() > self.capacity && budget > 0 {
            budget -= 1;
            let Some(id) = self.order.pop_front() else { break };
            let Some(slot) = self.map.get(&id) else { continue };
            match slot.clone().try_lock_owned() {
                Ok(mut guard) => {
                    *guard = None;
                    self.map.remove(&id);
                }
                // In use right now: keep it, look again later.
                Err(_) => self.order.push_back(id),
            }
        }
        // Drop ids of runs already gone so the queue does not grow without bound.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|id| map.contains_key(id));
        }
    }
}
