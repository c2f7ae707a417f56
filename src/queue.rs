//! Waiting room for an upstream whose eligible backends are all at
//! `max_concurrency`: bots that run one job at a time get the next job the
//! moment they finish one, in arrival order within priority classes.
//!
//! A request that finds every eligible backend busy joins the queue (or gets
//! `queue_full` at once if `max_waiting` are already waiting). When any backend
//! of the upstream frees a slot, the first live waiter of the highest class is
//! woken and picks again; while anyone is waiting, newcomers queue behind them
//! rather than taking freed slots. A waiter whose client leaves simply drops its
//! ticket; its entry is skipped when reached.

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
    classes: Mutex<[VecDeque<oneshot::Sender<()>>; 3]>,
}

/// A place in the queue; resolves when a slot may have freed.
#[derive(Debug)]
pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    woken: oneshot::Receiver<()>,
    live: bool,
}

impl WaitQueue {
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Joins at the back of `priority`'s class (at the front when `again`: a
    /// woken waiter that lost the race for the slot keeps its place). `None`
    /// when `max_waiting` are already waiting.
    pub fn join(&self, priority: Priority, max_waiting: usize, again: bool) -> Option<Ticket<'_>> {
        let mut classes = self.classes.lock().expect("never poisoned");
        if self.waiting.load(Ordering::Acquire) >= max_waiting {
            return None;
        }
        let (wake, woken) = oneshot::channel();
        let class = &mut classes[priority as usize];
        if again {
            class.push_front(wake);
        } else {
            class.push_back(wake);
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Some(Ticket { queue: self, woken, live: true })
    }

    /// A backend slot was freed: wake the first live waiter, if any.
    pub fn slot_freed(&self) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut classes = self.classes.lock().expect("never poisoned");
        for class in classes.iter_mut() {
            while let Some(wake) = class.pop_front() {
                // A dropped ticket's receiver is gone; skip it.
                if wake.send(()).is_ok() {
                    return;
                }
            }
        }
    }
}

impl Ticket<'_> {
    /// Waits until woken. The ticket is used up either way.
    pub async fn wait(mut self) {
        let _ = (&mut self.woken).await;
        self.leave();
    }

    fn leave(&mut self) {
        if std::mem::replace(&mut self.live, false) {
            self.queue.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.leave();
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
    fn a_full_queue_refuses() {
        let queue = WaitQueue::default();
        let _a = queue.join(Priority::Normal, 2, false).unwrap();
        let _b = queue.join(Priority::Low, 2, false).unwrap();
        assert!(queue.join(Priority::High, 2, false).is_none());
    }
}
