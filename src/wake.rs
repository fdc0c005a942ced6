//! Wake-ups that can wait until ferry's runtime is awake anyway.
//!
//! Waking a sleeping thread costs tens of microseconds of CPU on a small virtual machine (the
//! benchmark measures it): more than the rest of a record's work at a low rate, where every
//! thread sleeps between records. Some news need not wake anyone: no call waits for the
//! broker's acknowledgements, only the commit (every `commit_interval`), the partitions' bounds,
//! the drains (a revoke's, a stop's, `POST /drain`), a write made again after a failure and
//! readiness after a refused write. So while every worker of the runtime sleeps, such news
//! waits for the next thing that has a worker run a task anyway (a record, a service's answer, a
//! timer), and whoever sends it keeps a timer of its own for the case where nothing does (see
//! `produce::serve_acks`): the drains and the rest see it at most that much later. While a worker
//! is awake, news is delivered at once: it costs no wake-up then.
//!
//! Unless the pipeline waits for that news to go on: while the intake has a partition stopped
//! only by its in-flight bound, room comes back only as records end, with their
//! acknowledgements, and an acknowledgement that waited for a wake-up would hold everything up (at
//! full speed B3 fell to two thirds). The intake holds an [`Urgent`] meanwhile, and news goes at
//! once.
//!
//! Delivered in the unpark hook, a task woken goes to the runtime's shared queue: with more than
//! one worker (`FERRY_WORKER_THREADS`) that may wake a second worker to take it.
//!
//! Only a runtime built with [`count_sleep`] is counted; with any other (a library's user, a
//! test's), [`when_awake`] notifies at once, as if it were always awake.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The counted runtime's workers that are parked or about to park.
static ASLEEP: AtomicUsize = AtomicUsize::new(0);
/// The counted runtime's workers; `usize::MAX` until a runtime is counted (never all asleep).
static WORKERS: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Whether [`DEFERRED`] holds anything: read by every worker as it wakes, so a lock is taken
/// only when there is something to deliver.
static WAITING: AtomicBool = AtomicBool::new(false);
static DEFERRED: Mutex<Vec<Arc<Notify>>> = Mutex::new(Vec::new());
/// [`Urgent`]s held.
static URGENT: AtomicUsize = AtomicUsize::new(0);

/// Held while something waits for news: [`when_awake`] then notifies at once.
pub struct Urgent(());

impl Urgent {
    pub fn hold() -> Urgent {
        URGENT.fetch_add(1, SeqCst);
        Urgent(())
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        URGENT.fetch_sub(1, SeqCst);
    }
}

/// Counts when `builder`'s `workers` sleep, for [`when_awake`]. For the one runtime of a process.
pub fn count_sleep(builder: &mut tokio::runtime::Builder, workers: usize) -> &mut tokio::runtime::Builder {
    WORKERS.store(workers, SeqCst);
    builder
        .on_thread_park(|| {
            ASLEEP.fetch_add(1, SeqCst);
        })
        .on_thread_unpark(|| {
            ASLEEP.fetch_sub(1, SeqCst);
            if WAITING.load(SeqCst) {
                deliver();
            }
        })
}

/// Notifies `notify` now if a worker of the runtime is awake or an [`Urgent`] is held, else as
/// soon as a worker wakes. Callable from any thread.
pub fn when_awake(notify: &Arc<Notify>) {
    if !all_asleep() || URGENT.load(SeqCst) > 0 {
        notify.notify_one();
        return;
    }
    {
        let mut deferred = deferred();
        if !deferred.iter().any(|n| Arc::ptr_eq(n, notify)) {
            deferred.push(notify.clone());
        }
        WAITING.store(true, SeqCst);
    }
    // A worker that woke meanwhile may have looked before `WAITING` was set: then this sees it
    // awake (both sides write, then read the other's, in one order). An `Urgent` is taken on
    // a worker, whose wake-up delivered what waited before it.
    if !all_asleep() || URGENT.load(SeqCst) > 0 {
        deliver();
    }
}

fn all_asleep() -> bool {
    ASLEEP.load(SeqCst) >= WORKERS.load(SeqCst)
}

fn deferred() -> MutexGuard<'static, Vec<Arc<Notify>>> {
    DEFERRED.lock().unwrap_or_else(|p| p.into_inner())
}

fn deliver() {
    let waiting = {
        let mut deferred = deferred();
        WAITING.store(false, SeqCst);
        std::mem::take(&mut *deferred)
    };
    for notify in waiting {
        notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    /// Before a runtime is counted, the news is delivered at once. A counted runtime's one
    /// worker, asleep, is not woken for it; the next thing that wakes the worker delivers it;
    /// unless an `Urgent` is held. (One test: the count is the process's.)
    #[test]
    fn news_waits_for_a_sleeping_runtime_and_comes_with_its_next_wake_up() {
        let news = Arc::new(Notify::new());
        when_awake(&news);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), news.notified()).await })
            .expect("the news was not delivered at once");

        let mut builder = tokio::runtime::Builder::new_multi_thread();
        let runtime = count_sleep(builder.worker_threads(1).enable_all(), 1)
            .build()
            .expect("a runtime");
        let delivered = listen_then_sleep(&runtime, &news);
        when_awake(&news);
        // Nothing else runs on this runtime: asleep, it stays so, and the news waits.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            delivered.try_recv().is_err(),
            "the news woke the sleeping runtime"
        );
        let woken = Instant::now();
        runtime.spawn(async {});
        let at = delivered
            .recv_timeout(Duration::from_secs(10))
            .expect("the news never came");
        assert!(at >= woken);

        // Held, an `Urgent` has the news delivered at once to the sleeping runtime.
        let delivered = listen_then_sleep(&runtime, &news);
        let urgent = Urgent::hold();
        when_awake(&news);
        delivered
            .recv_timeout(Duration::from_secs(10))
            .expect("the urgent news waited");
        drop(urgent);
        assert_eq!(URGENT.load(SeqCst), 0);
    }

    /// Starts a task on `runtime` that says when `news` comes; returns once it listens and the
    /// worker has gone to sleep after it.
    fn listen_then_sleep(runtime: &tokio::runtime::Runtime, news: &Arc<Notify>) -> mpsc::Receiver<Instant> {
        let (listening, listens) = mpsc::channel();
        let (tx, delivered) = mpsc::channel();
        let news = news.clone();
        runtime.spawn(async move {
            let notified = news.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let _ = listening.send(());
            notified.await;
            let _ = tx.send(Instant::now());
        });
        listens
            .recv_timeout(Duration::from_secs(10))
            .expect("the task never ran");
        // Counted awake while it ran the task: asleep now means asleep after it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_asleep() {
            assert!(Instant::now() < deadline, "the worker never slept");
            std::thread::sleep(Duration::from_millis(1));
        }
        delivered
    }
}
