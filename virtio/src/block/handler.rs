//! The virtio-blk queue handler: pops available chains, executes them through a
//! [`RequestExecutor`], returns them to the used ring and signals the driver, honouring
//! VIRTIO_RING_F_EVENT_IDX. It knows nothing of EventFds or the event loop, so tests drive it
//! directly with `virtio_queue::mock::MockSplitQueue`.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::request::RequestExecutor;
use crate::device::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Errors of the queue handler.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The queue rings could not be accessed.
    #[error("virtio queue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Signalling the driver failed.
    #[error("interrupt failed: {0}")]
    Interrupt(#[from] std::io::Error),
}

/// One virtio-blk queue with its disk.
pub struct BlockQueueHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    index: u16,
    executor: RequestExecutor,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl BlockQueueHandler {
    /// A handler for queue `index`.
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        index: u16,
        executor: RequestExecutor,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        BlockQueueHandler {
            mem,
            queue,
            index,
            executor,
            interrupt,
        }
    }

    /// The queue state (for tests and snapshots).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The executor (to flush its disk when the VM is quiesced).
    pub fn executor_mut(&mut self) -> &mut RequestExecutor {
        &mut self.executor
    }

    /// Tears the handler down and gives the executor (and so the disk) back.
    pub fn into_executor(self) -> RequestExecutor {
        self.executor
    }

    /// Processes every available request; signals the driver if it needs it. Returns the number
    /// of requests completed.
    pub fn process_queue(&mut self) -> Result<usize, HandlerError> {
        let mut completed = 0;
        loop {
            self.queue.disable_notification(&self.mem)?;
            let mut this_pass = 0;
            // `iter` (unlike `pop_descriptor_chain`) reports a bogus avail index.
            while let Some(chain) = self.queue.iter(&self.mem)?.next() {
                let head = chain.head_index();
                let len = self.executor.execute(chain);
                if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                    log::warn!("virtio-blk: returning descriptor {head} failed: {e}");
                }
                this_pass += 1;
            }
            completed += this_pass;
            // Re-enable notifications; if more work raced in, go again. A pass that made no
            // progress while the ring claims more (unreadable ring entry) must not spin.
            if !self.queue.enable_notification(&self.mem)? || this_pass == 0 {
                break;
            }
        }
        if completed > 0 && self.queue.needs_notification(&self.mem)? {
            self.interrupt
                .trigger(VirtioInterruptType::Queue(self.index))?;
        }
        Ok(completed)
    }
}
