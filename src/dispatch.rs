//! Lanes: which records may run concurrently and which must wait for each other.
//!
//! Fed by the consumer thread with records in partition order; feeds the route handlers. Each
//! partition is one lane here: its records are handled strictly one after another, so replies
//! keep the partition's order and an in-place retry holds back only its own partition.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::offsets::Tp;
use crate::record::Record;
use crate::route::RouteHandler;

/// The open lanes, owned by the consumer thread.
pub struct Lanes {
    runtime: Handle,
    handlers: Arc<Vec<RouteHandler>>,
    /// One sender per partition lane. The channel is unbounded because the in-flight bound is
    /// enforced upstream by pausing the partition, never by blocking the poll loop.
    lanes: HashMap<Tp, mpsc::UnboundedSender<Record>>,
}

impl Lanes {
    pub fn new(runtime: Handle, handlers: Arc<Vec<RouteHandler>>) -> Self {
        Lanes {
            runtime,
            handlers,
            lanes: HashMap::new(),
        }
    }

    /// Queues `record` on its lane, opening the lane if needed.
    pub fn dispatch(&mut self, record: Record) {
        let tp = record.lease.tp.clone();
        let record = match self.lanes.get(&tp) {
            Some(tx) => match tx.send(record) {
                Ok(()) => return,
                // The lane ended (it never does while its sender lives, but be safe).
                Err(mpsc::error::SendError(r)) => r,
            },
            None => record,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
        let handlers = self.handlers.clone();
        self.runtime.spawn(async move {
            while let Some(r) = rx.recv().await {
                handlers[r.route].handle(r).await;
            }
        });
        // A fresh channel's receiver is alive, so this send cannot fail.
        let _ = tx.send(record);
        self.lanes.insert(tp, tx);
    }

    /// Closes the lanes of these partitions; their tasks end once their queue is handled (queued
    /// records of a revoked partition are abandoned quickly, see `RouteHandler::handle`).
    pub fn close(&mut self, tps: &[Tp]) {
        for tp in tps {
            self.lanes.remove(tp);
        }
    }

    pub fn close_all(&mut self) {
        self.lanes.clear();
    }
}
