//! Shared helpers for lb-core's property and simulation tests: a virtual clock, strategies
//! for generating inputs, and a plain reference model of health and ejection.
#![allow(dead_code, unreachable_pub, clippy::disallowed_methods)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Backend, BackendId, Balancer, Config, Event, Weight};
use proptest::prelude::*;

/// A virtual clock: an epoch plus milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub epoch: Instant,
    pub ms: u64,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            ms: 0,
        }
    }
    pub fn now(&self) -> Instant {
        self.epoch + Duration::from_millis(self.ms)
    }
    pub fn advance(&mut self, ms: u64) {
        self.ms += ms;
    }
    pub fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

pub fn kind() -> impl Strategy<Value = StrategyKind> {
    prop::sample::select(StrategyKind::ALL.to_vec())
}

pub fn backends(weights: &[u32]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            Backend::new(
                format!("10.0.{}.{}:80", i / 256, i % 256),
                Weight::new(w).unwrap(),
            )
        })
        .collect()
}

pub fn balancer(
    kind: StrategyKind,
    config: Config,
    weights: &[u32],
    now: Instant,
) -> (Balancer, Vec<BackendId>) {
    let lb = Balancer::new(config, AnySelect::new(kind)).unwrap();
    let ids = lb.set_backends(backends(weights), now).unwrap();
    (lb, ids)
}

/// What a reference model knows from the outside: probe health (recounted here from the
/// probe results fed in) and ejections (from the event stream).
#[derive(Debug, Default)]
pub struct Model {
    pub members: BTreeSet<BackendId>,
    /// (up, streak of disagreeing results)
    pub probe: HashMap<BackendId, (bool, u32)>,
    pub ejected: BTreeSet<BackendId>,
    pub rise: u32,
    pub fall: u32,
}

impl Model {
    pub fn new(ids: &[BackendId], rise: u32, fall: u32) -> Self {
        let mut m = Self {
            rise,
            fall,
            ..Self::default()
        };
        m.set_members(ids);
        m
    }

    pub fn set_members(&mut self, ids: &[BackendId]) {
        self.members = ids.iter().copied().collect();
        for id in ids {
            self.probe.entry(*id).or_insert((true, 0));
        }
        self.probe.retain(|id, _| self.members.contains(id));
        self.ejected.retain(|id| self.members.contains(id));
    }

    /// Feeds a probe result; returns the flip if the model expects one.
    pub fn probe(&mut self, id: BackendId, ok: bool) -> Option<bool> {
        let (rise, fall) = (self.rise, self.fall);
        let e = self.probe.get_mut(&id)?;
        if ok == e.0 {
            e.1 = 0;
            return None;
        }
        e.1 += 1;
        let t = if e.0 { fall } else { rise };
        if e.1 >= t {
            *e = (ok, 0);
            Some(ok)
        } else {
            None
        }
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Ejected { backend, .. } => {
                self.ejected.insert(*backend);
            }
            Event::Restored { backend, .. } => {
                self.ejected.remove(backend);
            }
            _ => {}
        }
    }

    pub fn up(&self, id: BackendId) -> bool {
        self.probe.get(&id).is_some_and(|e| e.0)
    }

    pub fn eligible(&self) -> Vec<BackendId> {
        self.members
            .iter()
            .copied()
            .filter(|id| self.up(*id) && !self.ejected.contains(id))
            .collect()
    }

    pub fn probe_up(&self) -> Vec<BackendId> {
        self.members
            .iter()
            .copied()
            .filter(|id| self.up(*id))
            .collect()
    }

    pub fn panic(&self, threshold_percent: u32) -> bool {
        let total = self.members.len();
        total > 0 && self.eligible().len() * 100 < threshold_percent as usize * total
    }
}
