//! A/B experiments: arms of routes, one picked per sticky key by a stable hash weighted by the
//! arms' weights, so a key keeps its arm across calls, restarts and processes.

use std::sync::atomic::{AtomicBool, Ordering};

/// One arm: the route its callers are served by and its share of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    pub name: String,
    pub route: String,
    pub weight: u32,
}

/// Which arm of which experiment a call was made for; carried by its usage records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExperimentArm {
    pub experiment: String,
    pub arm: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("unknown experiment `{0}`; experiments are named in the gateway config")]
    UnknownExperiment(String),
    #[error("experiment `{0}` has no arms; give it at least one")]
    NoArms(String),
}

/// An experiment. The first arm is the control: while the experiment is paused, every key gets it.
#[derive(Debug)]
pub struct Experiment {
    pub name: String,
    /// Hashed with the sticky key (the experiment's name unless configured).
    pub key: String,
    pub arms: Vec<Arm>,
    paused: AtomicBool,
}

impl Experiment {
    /// `arms` must not be empty and needs a weight above 0 (the config checks both); without
    /// one, every key gets the control.
    pub fn new(name: impl Into<String>, key: Option<String>, arms: Vec<Arm>) -> Self {
        let name = name.into();
        Self { key: key.unwrap_or_else(|| name.clone()), name, arms, paused: AtomicBool::new(false) }
    }

    /// The arm of `sticky_key`: the control while paused, otherwise the same arm for the same key
    /// and the same arms, whatever the process.
    pub fn assign(&self, sticky_key: &str) -> Option<&Arm> {
        if self.is_paused() {
            return self.arms.first();
        }
        let total: u64 = self.arms.iter().map(|a| u64::from(a.weight)).sum();
        if total == 0 {
            return self.arms.first();
        }
        // Multiply-shift maps the hash onto 0..total without the bias of a modulo.
        let point = ((u128::from(stable_hash(&self.key, sticky_key)) * u128::from(total)) >> 64) as u64;
        let mut start = 0;
        for arm in &self.arms {
            start += u64::from(arm.weight);
            if point < start {
                return Some(arm);
            }
        }
        self.arms.last()
    }

    /// Sends every key to the control until [`Experiment::resume`]; assignments are kept.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
}

/// FNV-1a over both strings, each prefixed with its length so that no two pairs run together,
/// then the SplitMix64 finalizer to spread FNV's weak low bits. Written out here rather than
/// taken from `std::hash`, whose output may change between Rust releases: a change here would
/// move users between arms, which the pinned values in the tests guard against.
pub fn stable_hash(key: &str, sticky_key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [key, sticky_key] {
        let len = part.len() as u64;
        for byte in len.to_le_bytes().iter().chain(part.as_bytes()) {
            h ^= u64::from(*byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experiment(weights: &[u32]) -> Experiment {
        let arms = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Arm { name: format!("arm{i}"), route: format!("r{i}"), weight: *w })
            .collect();
        Experiment::new("exp", None, arms)
    }

    fn arm_of<'a>(e: &'a Experiment, key: &str) -> &'a str {
        e.assign(key).map(|a| a.name.as_str()).unwrap_or("none")
    }

    /// Pinned so that a change of the hash, which would move users between arms, fails here.
    #[test]
    fn the_hash_is_pinned() {
        assert_eq!(stable_hash("exp", "user-1"), PINNED_USER_1);
        assert_eq!(stable_hash("", ""), PINNED_EMPTY);
        assert_ne!(stable_hash("ab", "c"), stable_hash("a", "bc"), "the parts must not run together");
    }

    // Computed by a separate Python implementation of the same steps.
    const PINNED_USER_1: u64 = 9_784_483_942_876_853_951;
    const PINNED_EMPTY: u64 = 7_526_961_181_645_162_559;

    #[test]
    fn zero_weight_arms_get_no_one_and_pausing_sends_everyone_to_the_control() {
        let e = experiment(&[0, 1, 0]);
        for i in 0..100 {
            assert_eq!(arm_of(&e, &format!("k{i}")), "arm1");
        }
        e.pause();
        assert!(e.is_paused());
        for i in 0..100 {
            assert_eq!(arm_of(&e, &format!("k{i}")), "arm0");
        }
        e.resume();
        assert_eq!(arm_of(&e, "k1"), "arm1");
    }

    #[test]
    fn the_key_reshuffles_assignments_and_the_name_does_not() {
        let arms = experiment(&[1, 1]).arms;
        let a = Experiment::new("a", Some("k".into()), arms.clone());
        let b = Experiment::new("b", Some("k".into()), arms.clone());
        let c = Experiment::new("a", Some("other".into()), arms);
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        assert!(keys.iter().all(|k| arm_of(&a, k) == arm_of(&b, k)));
        assert!(keys.iter().any(|k| arm_of(&a, k) != arm_of(&c, k)));
    }
}
