//! The cache of running executions' in-memory state, bounded by count and by bytes: when it
//! holds more runs than its capacity, or their state weighs more than its byte budget (as
//! `ExecState::bytes` counts it), the runs touched least recently and not in use are dropped.
//! Their state is durable, so the next event for one of them reloads it from its history.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::Slot;

struct Cached {
    slot: Slot,
    bytes: usize,
}

pub(crate) struct ExecCache {
    map: HashMap<String, Cached>,
    /// Run ids in the order they were inserted; may hold ids already removed.
    order: VecDeque<String>,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
}

impl ExecCache {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            bytes: 0,
        }
    }

    pub fn get(&self, run_id: &str) -> Option<&Slot> {
        self.map.get(run_id).map(|c| &c.slot)
    }

    pub fn insert(&mut self, run_id: String, slot: Slot) {
        self.order.push_back(run_id.clone());
        if let Some(old) = self.map.insert(run_id, Cached { slot, bytes: 0 }) {
            self.bytes -= old.bytes;
        }
        self.evict();
    }

    /// Records what a cached run's state weighs now.
    pub fn set_bytes(&mut self, run_id: &str, bytes: usize) {
        if let Some(c) = self.map.get_mut(run_id) {
            self.bytes = self.bytes - c.bytes + bytes;
            c.bytes = bytes;
            if self.bytes > self.max_bytes {
                self.evict();
            }
        }
    }

    pub fn remove(&mut self, run_id: &str) {
        if let Some(old) = self.map.remove(run_id) {
            self.bytes -= old.bytes;
        }
    }

    /// Removes `run_id` only if it still maps to `slot`.
    pub fn remove_if(&mut self, run_id: &str, slot: &Slot) {
        if self.map.get(run_id).is_some_and(|c| Arc::ptr_eq(&c.slot, slot)) {
            self.remove(run_id);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes of run state held, as counted.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn over(&self) -> bool {
        self.map.len() > self.capacity || self.bytes > self.max_bytes
    }

    fn evict(&mut self) {
        // Each pass looks at a bounded number of candidates so an insert stays cheap.
        let mut budget = 64;
        while self.over() && budget > 0 {
            budget -= 1;
            let Some(id) = self.order.pop_front() else { break };
            let Some(c) = self.map.get(&id) else { continue };
            match c.slot.clone().try_lock_owned() {
                Ok(mut guard) => {
                    *guard = None;
                    self.remove(&id);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn slot() -> Slot {
        Arc::new(tokio::sync::Mutex::new(None))
    }

    #[test]
    fn heavy_runs_are_evicted_by_bytes_oldest_first() {
        let mut c = ExecCache::new(100, 1_000);
        for i in 0..5 {
            c.insert(format!("r{i}"), slot());
            c.set_bytes(&format!("r{i}"), 300);
        }
        // 5 x 300 > 1,000: the oldest went until the rest fit.
        assert_eq!(c.len(), 3);
        assert!(c.get("r0").is_none() && c.get("r1").is_none() && c.get("r4").is_some());
        assert_eq!(c.bytes(), 900);
        c.remove("r4");
        assert_eq!(c.bytes(), 600);
    }

    #[test]
    fn a_run_in_use_is_kept_whatever_it_weighs() {
        let mut c = ExecCache::new(100, 100);
        let busy = slot();
        let _guard = busy.clone().try_lock_owned().unwrap();
        c.insert("busy".into(), busy);
        c.set_bytes("busy", 500);
        assert_eq!(c.len(), 1, "locked: not evicted");
        c.insert("idle".into(), slot());
        c.set_bytes("idle", 10);
        assert!(c.get("busy").is_some());
    }
}
