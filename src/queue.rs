//! Waiting room for an upstream whose eligible backends are all at
//! `max_concurrency`: bots that run one job at a time get the next job the
//! moment they finish one, in arrival order within priority classes.
//!
//! A request that finds every eligible backend busy joins the queue (or gets
//! `queue_full` at once if `max_waiting` are already waiting). When any backend
//! of the upstream frees a slot, the first live waiter of the highest class is
//! woken and picks again; while anyone is waiting, newcomers queue behind them
//! rather than taking freed slots. A waiter whose client leaves drops its
//! ticket, which takes its entry out of the queue (so memory is bounded by
//! `max_waiting`, whatever the churn), and hands on a wake-up it got but did
//! not use.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Priority classes, served strictly in this order, FIFO within each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Priority {
    /// From a `priority_header` value: `high`, `normal` or `low` (any case);
    /// anything else is `normal`.
    pub fn from_header(value: Option<&http::HeaderValue>) -> Priority {
        match value.map(|v| v.as_bytes()) {
            Some(v) if v.eq_ignore_ascii_case(b"high") => Priority::High,
            Some(v) if v.eq_ignore_ascii_case(b"low") => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

#[derive(Debug, Default)]
pub struct WaitQueue {
    /// Live tickets (joined and neither woken nor dropped).
    waiting: AtomicUsize,
    inner: Mutex<Classes>,
}

#[derive(Debug, Default)]
struct Classes {
    /// Waiters by class, each with its ticket's id so that a ticket that
    /// leaves takes its entry with it: the queue never holds more than the
    /// live waiters, however many come and go.
    classes: [VecDeque<(u64, oneshot::Sender<()>)>; 3],
    next_id: u64,
}

impl Classes {
    /// Wakes the first waiter of the highest class, if any.
    fn wake_first(&mut self) {
        for class in self.classes.iter_mut() {
            while let Some((_, wake)) = class.pop_front() {
                // Entries leave with their tickets, so the receiver is there;
                // `send` fails only for a receiver dropped mid-flight.
                if wake.send(()).is_ok() {
                    return;
                }
            }
        }
    }
}

/// A place in the queue; resolves when a slot may have freed.
#[derive(Debug)]
pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    id: u64,
    priority: Priority,
    woken: oneshot::Receiver<()>,
    /// Whether `wait` saw the wake-up (and so the waiter will act on it).
    used: bool,
}

impl WaitQueue {
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Joins at the back of `priority`'s class (at the front when `again`: a
    /// woken waiter that lost the race for the slot keeps its place). `None`
    /// when `max_waiting` are already waiting.
    pub fn join(&self, priority: Priority, max_waiting: usize, again: bool) -> Option<Ticket<'_>> {
        let mut inner = self.inner.lock().expect("never poisoned");
        if self.waiting.load(Ordering::Acquire) >= max_waiting {
            return None;
        }
        let (wake, woken) = oneshot::channel();
        let id = inner.next_id;
        inner.next_id += 1;
        let class = &mut inner.classes[priority as usize];
        if again {
            class.push_front((id, wake));
        } else {
            class.push_back((id, wake));
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Some(Ticket { queue: self, id, priority, woken, used: false })
    }

    /// A backend slot was freed: wake the first waiter, if any.
    pub fn slot_freed(&self) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        self.inner.lock().expect("never poisoned").wake_first();
    }

    /// Entries held, live or not (what the queue costs in memory).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.inner.lock().unwrap().classes.iter().map(VecDeque::len).sum()
    }
}

impl Ticket<'_> {
    /// Waits until woken. The ticket is used up either way.
    pub async fn wait(mut self) {
        if (&mut self.woken).await.is_ok() {
            self.used = true;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut inner = self.queue.inner.lock().expect("never poisoned");
        let class = &mut inner.classes[self.priority as usize];
        match class.iter().position(|(id, _)| *id == self.id) {
            // Never woken: leave the line.
            Some(position) => drop(class.remove(position)),
            // Woken, but gone before acting on it (the client left, or the
            // wait timed out just then): the wake-up goes to the next in line
            // rather than leaving a freed slot idle.
            None if !self.used => inner.wake_first(),
            None => {}
        }
        self.queue.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a queued wait ended without a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnded {
    /// `max_waiting` requests were already waiting.
    Full,
    /// The queue's own `timeout` ran out.
    Timeout,
    /// The request's own deadline (the route's `timeout`) came first.
    Deadline,
    /// Capacity is not merely busy: nothing could serve (unhealthy, circuit open).
    Unavailable,
}

impl WaitQueue {
    /// The wait protocol: `pick` first, unless others are already waiting (a
    /// newcomer queues behind them rather than taking the slot the first of them
    /// was woken for); while `all_busy` says the only obstacle is busy backends,
    /// wait in line for a slot to free, then pick again. Bounded by `timeout`
    /// from joining and by `deadline`. Returns what was picked and, if the
    /// request queued at all, for how long (the clock is read only then).
    pub async fn pick_or_wait<P, F>(
        &self,
        priority: Priority,
        max_waiting: usize,
        timeout: std::time::Duration,
        deadline: tokio::time::Instant,
        mut pick: impl FnMut() -> F,
        all_busy: impl Fn() -> bool,
    ) -> (Result<P, WaitEnded>, Option<std::time::Duration>)
    where
        F: std::future::Future<Output = Option<P>>,
    {
        let mut joined: Option<tokio::time::Instant> = None;
        let mut woken = false;
        let outcome = loop {
            if woken || self.waiting() == 0 {
                if let Some(picked) = pick().await {
                    break Ok(picked);
                }
                if !all_busy() {
                    break Err(WaitEnded::Unavailable);
                }
            }
            let joined_at = *joined.get_or_insert_with(tokio::time::Instant::now);
            let queue_deadline = joined_at + timeout;
            let until = queue_deadline.min(deadline);
            let Some(ticket) = self.join(priority, max_waiting, woken) else {
                break Err(WaitEnded::Full);
            };
            // Alone in the queue: a slot may have freed between the failed pick
            // and joining, with nobody there to be woken for it.
            if self.waiting() == 1 {
                if let Some(picked) = pick().await {
                    break Ok(picked);
                }
            }
            if tokio::time::timeout_at(until, ticket.wait()).await.is_err() {
                break Err(if until < queue_deadline { WaitEnded::Deadline } else { WaitEnded::Timeout });
            }
            woken = true;
        };
        (outcome, joined.map(|joined| joined.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_comes_from_the_header() {
        let value = |v: &'static str| http::HeaderValue::from_static(v);
        assert_eq!(Priority::from_header(Some(&value("HIGH"))), Priority::High);
        assert_eq!(Priority::from_header(Some(&value("low"))), Priority::Low);
        assert_eq!(Priority::from_header(Some(&value("urgent"))), Priority::Normal);
        assert_eq!(Priority::from_header(None), Priority::Normal);
    }

    #[tokio::test]
    async fn wakes_by_class_then_arrival_and_skips_the_departed() {
        let queue = WaitQueue::default();
        let first_normal = queue.join(Priority::Normal, 10, false).unwrap();
        let departed = queue.join(Priority::High, 10, false).unwrap();
        let second_normal = queue.join(Priority::Normal, 10, false).unwrap();
        let high = queue.join(Priority::High, 10, false).unwrap();
        assert_eq!(queue.waiting(), 4);
        drop(departed);
        assert_eq!(queue.waiting(), 3);
        let mut high = Box::pin(high.wait());
        let mut first = Box::pin(first_normal.wait());
        let mut second = Box::pin(second_normal.wait());
        queue.slot_freed();
        assert!(futures_util::FutureExt::now_or_never(&mut high).is_some(), "the live high waiter goes first");
        assert!(futures_util::FutureExt::now_or_never(&mut second).is_none());
        queue.slot_freed();
        assert!(futures_util::FutureExt::now_or_never(&mut first).is_some(), "then normal in arrival order");
        assert!(futures_util::FutureExt::now_or_never(&mut second).is_none());
        assert_eq!(queue.waiting(), 1);
    }

    #[test]
    fn departed_waiters_leave_no_entries_behind() {
        let queue = WaitQueue::default();
        let _stays = queue.join(Priority::Normal, 5, false).unwrap();
        for round in 0..10_000 {
            let priority = [Priority::High, Priority::Normal, Priority::Low][round % 3];
            let tickets: Vec<_> = (0..4).map(|_| queue.join(priority, 5, false).unwrap()).collect();
            assert!(queue.join(priority, 5, false).is_none());
            drop(tickets);
            assert_eq!(queue.entries(), 1, "round {round}: only the live waiter's entry is held");
        }
    }

    #[tokio::test]
    async fn a_wake_up_not_acted_on_passes_to_the_next_waiter() {
        let queue = WaitQueue::default();
        let first = queue.join(Priority::Normal, 10, false).unwrap();
        let second = queue.join(Priority::Normal, 10, false).unwrap();
        queue.slot_freed();
        // The first waiter's client leaves after it was woken, before it picked.
        drop(first);
        let mut second = Box::pin(second.wait());
        assert!(futures_util::FutureExt::now_or_never(&mut second).is_some(), "the second waiter got the slot");
        assert_eq!(queue.waiting(), 0);
    }

    #[test]
    fn a_full_queue_refuses() {
        let queue = WaitQueue::default();
        let _a = queue.join(Priority::Normal, 2, false).unwrap();
        let _b = queue.join(Priority::Low, 2, false).unwrap();
        assert!(queue.join(Priority::High, 2, false).is_none());
    }
}
