//! Membership and eligibility: who is in the pool, who may be picked, and the snapshot the
//! request path reads.
//!
//! Two views of eligibility, for two speeds:
//! * the published [`Snapshot`] (candidates and the strategy's table), rebuilt off the
//!   request path — by a reload, a probe flip, or the timer after an ejection — and only
//!   when the strategy's input (the candidates and their weights) changed;
//! * a per-backend `hidden` flag, set at once (an ejection on the request path, a removal,
//!   a probe going down), which every pick honours through [`PickCx::is_excluded`]
//!   (crate::select::PickCx::is_excluded). So no pick chooses an ejected backend while an
//!   eligible one exists, even before the table is rebuilt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{BackendId, BackendState, Weight};
use crate::event::Event;
use crate::health::{slow_start_percent, RiseFall};
use crate::retry::Open;
use crate::select::{Candidate, Select};

use super::timer::TimerTable;
use super::{push_event, Balancer};

/// What the request path reads: the candidates, the strategy's table, and how to find a
/// backend among them. Immutable once published.
#[derive(Debug)]
pub(super) struct Snapshot<T> {
    pub(super) generation: u64,
    pub(super) candidates: Vec<Candidate>,
    /// Every member (candidate or not) and its index among the candidates, if it is one.
    pub(super) members: HashMap<BackendId, Option<usize>>,
    pub(super) panic: bool,
    /// Shared with the next snapshot when its candidates are the same (a membership change
    /// among non-candidates, an ejection ignored by panic mode): no rebuild for nothing.
    pub(super) table: Arc<T>,
}

impl<T> Snapshot<T> {
    pub(super) fn empty(table: T) -> Self {
        Self {
            generation: 0,
            candidates: Vec::new(),
            members: HashMap::new(),
            panic: false,
            table: Arc::new(table),
        }
    }

    /// The index among this snapshot's candidates of the backend of an attempt that started
    /// in some snapshot, if it is one here.
    pub(super) fn index_of(&self, open: &Open) -> Option<usize> {
        if self.generation == open.generation {
            return Some(open.index);
        }
        self.members.get(&open.state.id).copied().flatten()
    }
}

/// The rare-path state, behind the control mutex.
#[derive(Debug, Default)]
pub(super) struct Control {
    pub(super) members: Vec<Member>,
    pub(super) by_id: HashMap<BackendId, usize>,
    pub(super) next_id: u32,
    pub(super) generation: u64,
    /// Members up by probes; of those, ejected; ejected in all. Kept exact on every change,
    /// so an ejection on the request path decides panic mode and `max_ejected_percent` in O(1).
    pub(super) up: usize,
    pub(super) up_ejected: usize,
    pub(super) ejected: usize,
    pub(super) panic: bool,
    /// Ejections panic mode ignores, as last reported.
    pub(super) ignored: usize,
    /// The priority group in use: the lowest with an eligible member (none: no member is).
    pub(super) group: Option<u16>,
    /// The candidates may differ from the published snapshot's.
    pub(super) dirty: bool,
    pub(super) timers: TimerTable,
    pub(super) events: std::collections::VecDeque<Event>,
}

#[derive(Debug)]
pub(super) struct Member {
    pub(super) state: Arc<BackendState>,
    pub(super) weight: Weight,
    pub(super) health: RiseFall,
    pub(super) ejected_until: Option<Instant>,
    pub(super) ramp_start: Option<Instant>,
    /// Drained by the operator: never a candidate, whatever probes, ejections or panic
    /// mode say (see [`Balancer::set_draining`]).
    pub(super) draining: bool,
    /// Its priority group ([`crate::Backend::with_priority`]).
    pub(super) priority: u16,
}

impl Member {
    pub(super) const fn is_eligible(&self, panic: bool) -> bool {
        !self.draining && self.health.is_up() && (panic || self.ejected_until.is_none())
    }

    /// Eligible and in the group in use: a candidate.
    pub(super) fn is_candidate(&self, panic: bool, group: Option<u16>) -> bool {
        self.is_eligible(panic) && group == Some(self.priority)
    }

    /// Makes the lock-free view agree: hidden if and only if not a candidate.
    pub(super) fn publish_flag(&self, panic: bool, group: Option<u16>) {
        let hidden = !self.is_candidate(panic, group);
        if self.state.is_hidden() != hidden {
            self.state
                .hidden
                .store(hidden, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// One backend as `/status` shows it. Fields are added as the core learns more about a
/// backend, hence `non_exhaustive`: read them, never build one.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    /// Its id.
    pub id: BackendId,
    /// Its address as configured.
    pub addr: String,
    /// Configured weight.
    pub weight: u32,
    /// Current slow-start share of that weight, in percent (100 when not ramping).
    pub weight_percent: u32,
    /// Up by active probes.
    pub healthy: bool,
    /// Passively ejected until then.
    pub ejected_until: Option<Instant>,
    /// Attempts in flight now.
    pub active_requests: u32,
    /// Attempts sent to it so far.
    pub requests_total: u64,
    /// Connection-level failures so far (refused, timed out, reset, broken bodies).
    pub failures_total: u64,
    /// Drained: takes no new request (see [`Balancer::set_draining`]).
    pub draining: bool,
    /// Its priority group ([`crate::Backend::with_priority`]).
    pub priority: u16,
}

// === impl Control ===

impl Control {
    /// Recounts `up`, `up_ejected` and `ejected` from scratch (rare paths only).
    pub(super) fn recount(&mut self) {
        self.up = self.members.iter().filter(|m| m.health.is_up()).count();
        self.ejected = self
            .members
            .iter()
            .filter(|m| m.ejected_until.is_some())
            .count();
        self.up_ejected = self
            .members
            .iter()
            .filter(|m| m.health.is_up() && m.ejected_until.is_some())
            .count();
    }

    /// Probe-healthy and not ejected.
    pub(super) const fn eligible(&self) -> usize {
        self.up - self.up_ejected
    }

    /// Turns panic mode on or off from the counts and reports what it does. Returns true if
    /// and only if it turned on or off (then every flag needs publishing again).
    pub(super) fn update_panic(&mut self, threshold_percent: u32) -> bool {
        let (total, eligible, up, up_ejected) = self.panic_counts();
        let panic = total > 0 && eligible * 100 < threshold_percent as usize * total;
        // What panic mode changes is exactly the ejected backends probes still call up.
        let ignored = if panic { up_ejected } else { 0 };
        let toggled = panic != self.panic;
        if toggled || ignored != self.ignored {
            self.panic = panic;
            self.ignored = ignored;
            push_event(
                self,
                Event::Panic {
                    on: panic,
                    eligible,
                    total,
                    down: total - up,
                    ignored,
                },
            );
        }
        toggled
    }

    /// What panic mode is judged on: (members, eligible, up by probes, up but ejected) of the
    /// priority group that would be in use without it (the lowest with an eligible member,
    /// else the lowest present). Standby groups do not count: two healthy primaries with
    /// three standbys down are a whole group in use, not 40 % of a pool. With one group
    /// (every member of priority 0, the common case) these are the pool's own counts, kept
    /// exact in O(1); with several, a scan (membership, probe and ejection changes only).
    fn panic_counts(&self) -> (usize, usize, usize, usize) {
        let lowest = self.members.iter().map(|m| m.priority).min();
        if self.members.iter().all(|m| Some(m.priority) == lowest) {
            return (
                self.members.len(),
                self.eligible(),
                self.up,
                self.up_ejected,
            );
        }
        let group = self
            .members
            .iter()
            .filter(|m| m.is_eligible(false))
            .map(|m| m.priority)
            .min()
            .or(lowest);
        let mut counts = (0, 0, 0, 0);
        for m in self.members.iter().filter(|m| Some(m.priority) == group) {
            let up = m.health.is_up();
            let ejected = m.ejected_until.is_some();
            counts.0 += 1;
            counts.1 += usize::from(up && !ejected);
            counts.2 += usize::from(up);
            counts.3 += usize::from(up && ejected);
        }
        counts
    }

    /// Recomputes the group in use; true if and only if it changed.
    pub(super) fn update_group(&mut self) -> bool {
        let panic = self.panic;
        let group = self
            .members
            .iter()
            .filter(|m| m.is_eligible(panic))
            .map(|m| m.priority)
            .min();
        let changed = group != self.group;
        self.group = group;
        changed
    }

    /// Publishes every member's flag, the group in use recomputed first.
    pub(super) fn publish_flags(&mut self) {
        self.update_group();
        for m in &self.members {
            m.publish_flag(self.panic, self.group);
        }
    }

    /// Publishes member `i`'s flag after a change to it; every flag if that changed the
    /// group in use (its last eligible member left, or one of a lower group returned).
    pub(super) fn publish_member(&mut self, i: usize) {
        if self.update_group() {
            self.publish_flags();
        } else {
            self.members[i].publish_flag(self.panic, self.group);
        }
    }
}

// === impl Balancer: membership and snapshots ===

impl<S: Select> Balancer<S> {
    /// Whether returning backends ramp up: slow start configured and the strategy uses it.
    pub(super) fn ramps(&self) -> bool {
        !self.config.passive.slow_start.is_zero() && self.select.slow_start()
    }

    pub(super) fn ramp_percent(&self, m: &Member, now: Instant) -> u32 {
        m.ramp_start.map_or(100, |r| {
            slow_start_percent(
                now.saturating_duration_since(r),
                self.config.passive.slow_start,
            )
        })
    }

    /// Replaces the members (see `Balancer::set_backends`), under the control lock.
    pub(super) fn replace_members(
        &self,
        ctl: &mut Control,
        backends: Vec<crate::backend::Backend>,
        now: Instant,
    ) -> Vec<BackendId> {
        let first = ctl.members.is_empty();
        let mut old: HashMap<String, Member> = ctl
            .members
            .drain(..)
            .map(|m| (m.state.identity.clone(), m))
            .collect();
        let mut ids = Vec::with_capacity(backends.len());
        let mut rewritten = Vec::new();
        for b in backends {
            // Kept only if it is still written the same (its state shows the address); one
            // written anew is a new member, and the old one goes as a removed one does.
            let kept = match old.remove(b.identity()) {
                Some(m) if m.state.addr != b.addr() => {
                    rewritten.push(m);
                    None
                }
                kept => kept,
            };
            let member = if let Some(mut m) = kept {
                m.weight = b.weight();
                m.priority = b.priority();
                m
            } else {
                let id = BackendId(ctl.next_id);
                ctl.next_id += 1;
                let state = Arc::new(BackendState::with_identity(
                    id,
                    b.addr().to_owned(),
                    b.identity().to_owned(),
                ));
                self.latency.start(&state, self.ticks(now));
                Member {
                    state,
                    weight: b.weight(),
                    health: RiseFall::new(true),
                    ejected_until: None,
                    ramp_start: (!first && self.ramps()).then_some(now),
                    draining: false,
                    priority: b.priority(),
                }
            };
            ids.push(member.state.id);
            ctl.members.push(member);
        }
        // Removed: never picked again, from this instant, whatever snapshot a pick reads.
        for m in old.values().chain(&rewritten) {
            m.state
                .hidden
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        ctl.by_id = ctl
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.state.id, i))
            .collect();
        ctl.recount();
        ctl.update_panic(self.config.passive.panic_threshold_percent);
        ctl.publish_flags();
        ctl.dirty = true;
        ids
    }

    fn candidates(&self, ctl: &Control, now: Instant) -> Vec<Candidate> {
        // Panic mode overrides ejections, never probes: a backend that fails its health
        // checks is not sent traffic, so "no healthy backend" is always a 503.
        ctl.members
            .iter()
            .filter(|m| m.is_candidate(ctl.panic, ctl.group))
            .map(|m| Candidate {
                weight: (m.weight.get() * self.ramp_percent(m, now)).max(1),
                base_weight: m.weight.get(),
                state: Arc::clone(&m.state),
            })
            .collect()
    }

    /// Publishes a snapshot of the current eligible set if it may have changed, building the
    /// strategy's table only if its input did. The build runs outside the control lock (the
    /// request path takes that lock for ejections), serialized by a lock of its own so
    /// snapshots publish in order. On the request path only from a pick that found nothing
    /// (`Balancer::pick`): then usually nothing is dirty and it returns at once; or it waits
    /// for the rebuild of a set change under way, or does the one the timer would have done
    /// after an ejection (once: that clears `dirty`).
    pub(super) fn rebuild(&self, now: Instant) {
        let _serial = self
            .rebuilding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (candidates, members, panic, generation) = {
            let mut ctl = self.control();
            if !ctl.dirty {
                return;
            }
            ctl.dirty = false;
            ctl.timers.set(super::timer::Timer::Rebuild, None);
            self.publish_deadline(&ctl);
            ctl.generation += 1;
            let candidates = self.candidates(&ctl, now);
            let mut members: HashMap<BackendId, Option<usize>> =
                ctl.members.iter().map(|m| (m.state.id, None)).collect();
            for (i, c) in candidates.iter().enumerate() {
                members.insert(c.id(), Some(i));
            }
            (candidates, members, ctl.panic, ctl.generation)
        };
        let old = self.snapshot.load_full();
        let same_input = old.candidates.len() == candidates.len()
            && old.candidates.iter().zip(&candidates).all(|(a, b)| {
                Arc::ptr_eq(&a.state, &b.state)
                    && a.weight == b.weight
                    && a.base_weight == b.base_weight
            });
        let table = if same_input {
            Arc::clone(&old.table)
        } else {
            Arc::new(self.select.build(&candidates))
        };
        drop(old);
        self.snapshot.store(Arc::new(Snapshot {
            generation,
            candidates,
            members,
            panic,
            table,
        }));
        // Loads that changed while the table was built are folded in now that it is visible.
        if self.select.tracks_load() {
            let now_ns = self.ticks(now);
            let snap = self.snapshot.load();
            for i in 0..snap.candidates.len() {
                self.load_changed(&snap, Some(i), now_ns);
            }
        }
    }

    /// Every backend's state, in configured order.
    #[must_use]
    pub fn backends(&self, now: Instant) -> Vec<BackendStatus> {
        let ctl = self.control();
        ctl.members
            .iter()
            .map(|m| BackendStatus {
                id: m.state.id,
                addr: m.state.addr.clone(),
                weight: m.weight.get(),
                weight_percent: self.ramp_percent(m, now),
                healthy: m.health.is_up(),
                ejected_until: m.ejected_until.filter(|&u| u > now),
                active_requests: m.state.in_flight(),
                requests_total: m
                    .state
                    .requests_total
                    .load(std::sync::atomic::Ordering::Relaxed),
                failures_total: m
                    .state
                    .failures_total
                    .load(std::sync::atomic::Ordering::Relaxed),
                draining: m.draining,
                priority: m.priority,
            })
            .collect()
    }

    /// Drains a backend (`on`) or ends its drain. A draining backend takes no new request
    /// under any strategy, retries included, from the moment this returns (consistent-hash
    /// keys move off it as if it had left); attempts in flight on it go on and finish as
    /// usual. It keeps its id, health, ejection and counters, and
    /// [`set_backends`](Self::set_backends) keeps the drain of a backend that stays (end it
    /// with `on = false`). The eligible share that panic mode compares with its threshold
    /// still counts it (panic mode never overrides a drain).
    ///
    /// Returns false, changing nothing, if `id` is not a member.
    pub fn set_draining(&self, id: BackendId, on: bool, now: Instant) -> bool {
        self.change_member(id, now, |m| m.draining = on)
    }

    /// Changes a member's weight at once (the next snapshot uses it), keeping everything
    /// else about it. Returns false, changing nothing, if `id` is not a member.
    pub fn set_weight(&self, id: BackendId, weight: Weight, now: Instant) -> bool {
        self.change_member(id, now, |m| m.weight = weight)
    }

    /// Applies `change` to member `id`, then makes its flag and the snapshot agree.
    fn change_member(&self, id: BackendId, now: Instant, change: impl FnOnce(&mut Member)) -> bool {
        self.ticks(now);
        {
            let mut ctl = self.control();
            let Some(&i) = ctl.by_id.get(&id) else {
                return false;
            };
            change(&mut ctl.members[i]);
            // Hidden at once: no pick from the snapshot still published chooses it.
            ctl.publish_member(i);
            ctl.dirty = true;
            self.schedule(&mut ctl, now);
        }
        self.rebuild(now);
        true
    }
}
