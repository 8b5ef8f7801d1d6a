//! Passive outlier ejection (Envoy's consecutive-failure detector), its expiry, and the
//! probe verdicts that share its bookkeeping.
//!
//! An ejection fires on the request path, inside `handle_outcome` or `finish` of the request
//! whose failure crossed the threshold. So it does O(1) work under the control lock: mark the
//! member, adjust the counts panic mode and `max_ejected_percent` read, hide the backend from
//! picks, and ask the timer for a rebuild. The snapshot and table rebuild — O(n) and, for
//! Maglev with thousands of backends, far from free — run at the timer's next turn.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::backend::{BackendId, BackendState};
use crate::event::Event;
use crate::health::ejection_duration;
use crate::outcome::{ProbeFailure, ProbeResult};
use crate::select::Select;

use super::pool::Snapshot;
use super::timer::Timer;
use super::{later, push_event, Balancer};

impl<S: Select> Balancer<S> {
    /// Counts one connection-level failure; ejects the backend at the threshold if allowed.
    pub(super) fn passive_failure(
        &self,
        s: &BackendState,
        snap: &Snapshot<S::Table>,
        idx: Option<usize>,
        now: Instant,
        now_ns: u64,
    ) {
        s.failures_total.fetch_add(1, Ordering::Relaxed);
        let p = self.config.passive;
        if p.consecutive_failures == 0 {
            return;
        }
        let n = s
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n < p.consecutive_failures {
            return;
        }
        let mut ctl = self.control();
        let Some(&i) = ctl.by_id.get(&s.id) else {
            return;
        };
        if ctl.members[i].ejected_until.is_some() {
            return;
        }
        let total = ctl.members.len();
        if (ctl.ejected + 1) * 100 > p.max_ejected_percent as usize * total {
            return; // Stays counted: the next failure asks again once others return.
        }
        let m = &mut ctl.members[i];
        let row = m
            .state
            .ejection_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let until = later(now, ejection_duration(p.ejection, p.max_ejection, row));
        m.ejected_until = Some(until);
        m.ramp_start = None;
        m.state.consecutive_failures.store(0, Ordering::Relaxed);
        let up = m.health.is_up();
        ctl.ejected += 1;
        ctl.up_ejected += usize::from(up);
        push_event(
            &mut ctl,
            Event::Ejected {
                backend: s.id,
                addr: s.addr.clone(),
                until,
                failures: n,
                ejections: row,
            },
        );
        if ctl.update_panic(p.panic_threshold_percent) {
            ctl.publish_flags();
        } else {
            ctl.publish_member(i);
        }
        ctl.timers.set_earlier(Timer::Ejection, until);
        ctl.timers.set_earlier(Timer::Rebuild, now);
        ctl.dirty = true;
        self.publish_deadline(&ctl);
        drop(ctl);
        // A load-indexed table must see the hidden backend as unpickable now, not at the rebuild.
        self.load_changed(snap, idx, now_ns);
    }

    /// A returned backend served a request well: its next ejection starts a new row.
    pub(super) fn end_ejection_row(&self, id: BackendId) {
        let ctl = self.control();
        if let Some(&i) = ctl.by_id.get(&id) {
            let m = &ctl.members[i];
            if m.ejected_until.is_none() {
                m.state.ejection_row.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Ends the ejections due by `now` (with slow start), under the control lock.
    pub(super) fn expire_ejections(&self, ctl: &mut super::pool::Control, now: Instant) {
        let ramps = self.ramps();
        let mut restored = Vec::new();
        for m in &mut ctl.members {
            if m.ejected_until.is_some_and(|u| u <= now) {
                m.ejected_until = None;
                if ramps {
                    m.ramp_start = Some(now);
                }
                restored.push(Event::Restored {
                    backend: m.state.id,
                    addr: m.state.addr.clone(),
                });
            }
        }
        if !restored.is_empty() {
            ctl.dirty = true;
        }
        for e in restored {
            push_event(ctl, e);
        }
    }

    /// Records one active probe result; a backend flips after `rise`/`fall` in a row.
    /// Results for unknown (removed) backends are ignored.
    pub fn handle_probe(&self, backend: BackendId, result: ProbeResult, now: Instant) {
        self.ticks(now);
        let (rise, fall) = (self.config.health.rise, self.config.health.fall);
        {
            let mut ctl = self.control();
            let Some(&i) = ctl.by_id.get(&backend) else {
                return;
            };
            let ramps = self.ramps();
            let m = &mut ctl.members[i];
            let Some(up) = m.health.observe(result.is_success(), rise, fall) else {
                return;
            };
            let addr = m.state.addr.clone();
            let event = if up {
                if ramps {
                    m.ramp_start = Some(now);
                }
                Event::Up {
                    backend,
                    addr,
                    successes: rise,
                }
            } else {
                let last = match result {
                    ProbeResult::Failure(f) => f,
                    ProbeResult::Success => ProbeFailure::Other,
                };
                m.ramp_start = None;
                Event::Down {
                    backend,
                    addr,
                    failures: fall,
                    last,
                }
            };
            push_event(&mut ctl, event);
            ctl.recount();
            ctl.update_panic(self.config.passive.panic_threshold_percent);
            ctl.publish_flags();
            ctl.dirty = true;
            self.schedule(&mut ctl, now);
        }
        self.rebuild(now);
    }
}
