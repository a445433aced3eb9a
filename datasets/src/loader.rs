//! Shuffled, augmented, normalized mini-batches for training, prepared on a background
//! thread.
//!
//! Everything random is a function of `(seed, epoch)` (the record order) and
//! `(seed, epoch, batch index)` (the augmentation of that batch's images, drawn image after
//! image), never of timing: a slow or a fast consumer, a fresh iterator or one resumed with
//! [`Loader::epoch_from`], all see bit-identical batches.
//!
//! ```
//! use flatmin_datasets::{synthetic, Augment, Loader};
//! use std::sync::Arc;
//! let (train, _test) = synthetic(100, 10, 0);
//! let loader = Loader::new(Arc::new(train), 32, true, false, Augment::standard(), 7).unwrap();
//! assert_eq!(loader.batches_per_epoch(), 4);
//! for batch in loader.epoch::<f32>(0) {
//!     assert_eq!(batch.x.len(), batch.len() * 3072); // normalized NCHW [n, 3, 32, 32]
//!     assert_eq!(batch.labels.len(), batch.len());
//! }
//! ```

use crate::augment::Augment;
use crate::cifar10::{Batch, IMAGE_BYTES};
use crate::normalize::{normalize_pixels_f32, normalize_pixels_f64};
use crate::seed::{derived_rng, tag};
use crate::subset::{check_batch, SubsetError};
use rand::seq::SliceRandom;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use thiserror::Error;

/// Number of prepared mini-batches that may wait for the consumer (the bounded channel's
/// depth), unless changed with [`Loader::with_prefetch`].
pub const DEFAULT_PREFETCH: usize = 3;

/// Why a [`Loader`] cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LoaderError {
    /// The batch size is zero.
    #[error("batch size must be at least 1")]
    ZeroBatchSize,
    /// The dataset holds no record.
    #[error("the dataset is empty")]
    Empty,
    /// With `drop_last`, the batch size exceeds the dataset, so an epoch has no batch.
    #[error(
        "batch size {batch_size} with drop_last leaves no batch of a {records}-record dataset"
    )]
    NoFullBatch {
        /// The batch size.
        batch_size: usize,
        /// Records in the dataset.
        records: usize,
    },
    /// The dataset is inconsistent (hand-built): see [`SubsetError::Malformed`].
    #[error(transparent)]
    Malformed(#[from] SubsetError),
}

/// The element type of prepared mini-batches: `f32` or `f64` (normalized as in
/// [`crate::normalize`]), or `u8` (the augmented pixel bytes themselves).
pub trait Element: Copy + Send + 'static {
    /// Converts NCHW pixel bytes (whole 3 x 32 x 32 images) to this type.
    fn from_pixels(pixels: Vec<u8>) -> Vec<Self>;
}

impl Element for f32 {
    fn from_pixels(pixels: Vec<u8>) -> Vec<f32> {
        normalize_pixels_f32(&pixels)
    }
}

impl Element for f64 {
    fn from_pixels(pixels: Vec<u8>) -> Vec<f64> {
        normalize_pixels_f64(&pixels)
    }
}

impl Element for u8 {
    fn from_pixels(pixels: Vec<u8>) -> Vec<u8> {
        pixels
    }
}

/// One prepared mini-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct MiniBatch<T> {
    /// The epoch it belongs to.
    pub epoch: usize,
    /// Its index within the epoch, from 0.
    pub index: usize,
    /// Indices of its records in the loader's dataset, in batch order.
    pub records: Vec<usize>,
    /// Class index of each image.
    pub labels: Vec<usize>,
    /// The images, NCHW `[len, 3, 32, 32]`: augmented, then converted by [`Element`].
    pub x: Vec<T>,
}

impl<T> MiniBatch<T> {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the batch holds no image (never the case for a batch from a [`Loader`]).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The NCHW shape of `x`: `[len, 3, 32, 32]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.len(), 3, 32, 32]
    }
}

/// Mini-batches of a dataset, epoch after epoch; see the module docs.
#[derive(Clone, Debug)]
pub struct Loader {
    data: Arc<Batch>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    augment: Augment,
    seed: u64,
    prefetch: usize,
}

impl Loader {
    /// A loader over `data` in batches of `batch_size` records.
    ///
    /// - `shuffle`: each epoch visits the records in a permutation drawn from
    ///   `(seed, epoch)`; otherwise in dataset order.
    /// - `drop_last`: the last, partial batch of an epoch is dropped; otherwise it is
    ///   yielded, smaller.
    /// - `augment`: applied to every image, drawn from `(seed, epoch, batch index)`.
    ///
    /// Errors: a zero batch size, an empty or malformed dataset, or `drop_last` with a
    /// batch size larger than the dataset (an epoch would hold no batch).
    pub fn new(
        data: Arc<Batch>,
        batch_size: usize,
        shuffle: bool,
        drop_last: bool,
        augment: Augment,
        seed: u64,
    ) -> Result<Self, LoaderError> {
        check_batch(&data)?;
        if batch_size == 0 {
            return Err(LoaderError::ZeroBatchSize);
        }
        if data.is_empty() {
            return Err(LoaderError::Empty);
        }
        if drop_last && batch_size > data.len() {
            return Err(LoaderError::NoFullBatch {
                batch_size,
                records: data.len(),
            });
        }
        Ok(Loader {
            data,
            batch_size,
            shuffle,
            drop_last,
            augment,
            seed,
            prefetch: DEFAULT_PREFETCH,
        })
    }

    /// Sets how many prepared batches may wait for the consumer (at least 1; default
    /// [`DEFAULT_PREFETCH`]). Does not change the batches.
    pub fn with_prefetch(mut self, depth: usize) -> Self {
        self.prefetch = depth.max(1);
        self
    }

    /// The dataset.
    pub fn data(&self) -> &Arc<Batch> {
        &self.data
    }

    /// Number of records in the dataset.
    pub fn records(&self) -> usize {
        self.data.len()
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The augmentation applied.
    pub fn augment(&self) -> Augment {
        self.augment
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of batches in every epoch: `ceil(records / batch_size)`, or
    /// `floor(records / batch_size)` with `drop_last`.
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.data.len() / self.batch_size
        } else {
            self.data.len().div_ceil(self.batch_size)
        }
    }

    /// Number of records visited in every epoch (all of them, unless `drop_last` drops the
    /// last partial batch).
    pub fn records_per_epoch(&self) -> usize {
        if self.drop_last {
            self.batches_per_epoch() * self.batch_size
        } else {
            self.data.len()
        }
    }

    /// The order in which epoch `epoch` visits the records (a permutation of the dataset
    /// indices, the identity without shuffling).
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        if self.shuffle {
            order.shuffle(&mut derived_rng(self.seed, &[tag::ORDER, epoch as u64]));
        }
        order
    }

    /// Prepares batch `index` of epoch `epoch` on the calling thread (what the iterators
    /// yield, computed directly). `None` when `index >= batches_per_epoch()`.
    pub fn batch<T: Element>(&self, epoch: usize, index: usize) -> Option<MiniBatch<T>> {
        if index >= self.batches_per_epoch() {
            return None;
        }
        Some(self.prepare(epoch, index, &self.order(epoch)))
    }

    /// Gathers, augments and converts batch `index` of an epoch whose order is `order`.
    fn prepare<T: Element>(&self, epoch: usize, index: usize, order: &[usize]) -> MiniBatch<T> {
        let start = index * self.batch_size;
        let end = (start + self.batch_size).min(order.len());
        let records = order[start..end].to_vec();
        let labels = records
            .iter()
            .map(|&i| usize::from(self.data.labels[i]))
            .collect();
        let mut pixels = vec![0u8; records.len() * IMAGE_BYTES];
        if self.augment.is_identity() {
            for (out, &i) in pixels.chunks_exact_mut(IMAGE_BYTES).zip(&records) {
                out.copy_from_slice(self.data.image(i));
            }
        } else {
            let path = [tag::AUGMENT, epoch as u64, index as u64];
            let mut rng = derived_rng(self.seed, &path);
            for (out, &i) in pixels.chunks_exact_mut(IMAGE_BYTES).zip(&records) {
                self.augment.apply(self.data.image(i), out, &mut rng);
            }
        }
        MiniBatch {
            epoch,
            index,
            records,
            labels,
            x: T::from_pixels(pixels),
        }
    }

    /// The batches of epoch `epoch`, prepared ahead on a background thread (named
    /// `fm-load-e<epoch>`), at most the prefetch depth ahead of the consumer.
    ///
    /// # Panics
    /// If the operating system cannot start a thread.
    pub fn epoch<T: Element>(&self, epoch: usize) -> Batches<T> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of epoch `epoch` from batch `start_batch` on: the same batches as
    /// `epoch(epoch).skip(start_batch)`, without preparing the skipped ones (for resuming
    /// a run mid-epoch). Empty when `start_batch >= batches_per_epoch()`.
    ///
    /// # Panics
    /// If the operating system cannot start a thread.
    pub fn epoch_from<T: Element>(&self, epoch: usize, start_batch: usize) -> Batches<T> {
        let total = self.batches_per_epoch();
        let start = start_batch.min(total);
        if start == total {
            return Batches {
                rx: None,
                worker: None,
                remaining: 0,
            };
        }
        let (tx, rx) = sync_channel(self.prefetch);
        let loader = self.clone();
        let worker = std::thread::Builder::new()
            .name(format!("fm-load-e{epoch}"))
            .spawn(move || {
                let order = loader.order(epoch);
                for index in start..total {
                    let batch = loader.prepare::<T>(epoch, index, &order);
                    if tx.send(batch).is_err() {
                        return; // the consumer dropped the iterator
                    }
                }
            })
            .expect("spawn the mini-batch preparation thread");
        Batches {
            rx: Some(rx),
            worker: Some(worker),
            remaining: total - start,
        }
    }
}

/// The mini-batches of one epoch, in order, prepared ahead by a background thread (see
/// [`Loader::epoch`]). Dropping it early stops and joins that thread.
#[derive(Debug)]
pub struct Batches<T> {
    rx: Option<Receiver<MiniBatch<T>>>,
    worker: Option<JoinHandle<()>>,
    remaining: usize,
}

impl<T> Batches<T> {
    /// Joins the worker, re-raising its panic if it had one.
    fn join(&mut self) {
        self.rx = None; // unblocks a worker waiting to send
        if let Some(worker) = self.worker.take() {
            if let Err(panic) = worker.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl<T> Iterator for Batches<T> {
    type Item = MiniBatch<T>;

    fn next(&mut self) -> Option<MiniBatch<T>> {
        if self.remaining == 0 {
            self.join();
            return None;
        }
        match self.rx.as_ref().map(Receiver::recv) {
            Some(Ok(batch)) => {
                self.remaining -= 1;
                Some(batch)
            }
            _ => {
                // The worker ended before sending every batch: it panicked.
                self.remaining = 0;
                self.join();
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<T> ExactSizeIterator for Batches<T> {}

impl<T> Drop for Batches<T> {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cifar10::CLASSES;

    /// `n` records; image `i` has every byte `i % 256` except the first, which is
    /// `(i / 256) as u8`, so each record is identifiable; labels `i % 10`.
    fn data(n: usize) -> Arc<Batch> {
        let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
        for i in 0..n {
            pixels.push((i / 256) as u8);
            pixels.resize(pixels.len() + IMAGE_BYTES - 1, (i % 256) as u8);
        }
        Arc::new(Batch {
            labels: (0..n).map(|i| (i % CLASSES) as u8).collect(),
            pixels,
        })
    }

    fn loader(n: usize, bs: usize, shuffle: bool, drop_last: bool, aug: Augment) -> Loader {
        Loader::new(data(n), bs, shuffle, drop_last, aug, 1234).unwrap()
    }

    #[test]
    fn batch_counts_and_drop_last() {
        let l = loader(103, 10, true, false, Augment::none());
        assert_eq!((l.batches_per_epoch(), l.records_per_epoch()), (11, 103));
        let sizes: Vec<usize> = l.epoch::<u8>(0).map(|b| b.len()).collect();
        assert_eq!(sizes, [vec![10; 10], vec![3]].concat());
        let l = loader(103, 10, true, true, Augment::none());
        assert_eq!((l.batches_per_epoch(), l.records_per_epoch()), (10, 100));
        let it = l.epoch::<u8>(0);
        assert_eq!(it.len(), 10);
        let batches: Vec<_> = it.collect();
        assert!(batches.iter().all(|b| b.len() == 10));
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.records.clone()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 100, "no record twice");
        // Exact multiple: drop_last changes nothing.
        let l = loader(100, 10, false, true, Augment::none());
        assert_eq!(l.batches_per_epoch(), 10);
        assert_eq!(
            loader(100, 100, false, true, Augment::none()).batches_per_epoch(),
            1
        );
        assert_eq!(
            loader(100, 101, false, false, Augment::none()).batches_per_epoch(),
            1
        );
    }

    #[test]
    fn every_record_once_per_epoch() {
        for shuffle in [false, true] {
            let l = loader(257, 16, shuffle, false, Augment::standard());
            for epoch in 0..3 {
                let mut count = vec![0usize; 257];
                for (k, b) in l.epoch::<u8>(epoch).enumerate() {
                    assert_eq!((b.epoch, b.index), (epoch, k));
                    for (j, &r) in b.records.iter().enumerate() {
                        count[r] += 1;
                        assert_eq!(b.labels[j], r % 10);
                    }
                }
                assert!(count.iter().all(|&c| c == 1), "shuffle {shuffle}");
            }
        }
        // Without shuffling the order is the dataset order; with it, it changes per epoch.
        let plain = loader(50, 8, false, false, Augment::none());
        assert_eq!(plain.order(3), (0..50).collect::<Vec<_>>());
        let l = loader(50, 8, true, false, Augment::none());
        assert_ne!(l.order(0), l.order(1));
        assert_ne!(l.order(0), plain.order(0));
    }

    #[test]
    fn gathers_the_right_images() {
        let l = loader(300, 7, true, false, Augment::none());
        for b in l.epoch::<u8>(2) {
            for (j, &r) in b.records.iter().enumerate() {
                assert_eq!(&b.x[j * IMAGE_BYTES..][..IMAGE_BYTES], l.data().image(r));
            }
        }
        // f32 / f64 are the normalized bytes.
        let raw = l.batch::<u8>(1, 3).unwrap();
        let x32 = l.batch::<f32>(1, 3).unwrap();
        let x64 = l.batch::<f64>(1, 3).unwrap();
        assert_eq!(x32.x, normalize_pixels_f32(&raw.x));
        assert_eq!(x64.x, normalize_pixels_f64(&raw.x));
        assert_eq!(x32.records, raw.records);
        assert_eq!(x32.shape(), [7, 3, 32, 32]);
        assert!(l.batch::<u8>(1, l.batches_per_epoch()).is_none());
    }

    #[test]
    fn deterministic_regardless_of_consumer_speed() {
        let make =
            |prefetch| loader(200, 16, true, false, Augment::standard()).with_prefetch(prefetch);
        let fast: Vec<MiniBatch<f32>> = make(4).epoch(5).collect();
        let slow: Vec<MiniBatch<f32>> = make(1)
            .epoch(5)
            .inspect(|_| std::thread::sleep(std::time::Duration::from_millis(3)))
            .collect();
        assert_eq!(fast.len(), 13);
        for (a, b) in fast.iter().zip(&slow) {
            assert_eq!(a.records, b.records);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.x), bits(&b.x), "bit-identical");
        }
        // And equal to the synchronous path, batch by batch.
        let l = make(2);
        for (k, b) in fast.iter().enumerate() {
            assert_eq!(&l.batch::<f32>(5, k).unwrap(), b);
        }
        // Another epoch or seed differs (order and augmentation).
        let other: Vec<MiniBatch<f32>> = l.epoch(6).collect();
        assert_ne!(other[0].records, fast[0].records);
        let reseeded = Loader::new(data(200), 16, true, false, Augment::standard(), 1);
        assert_ne!(
            reseeded.unwrap().batch::<u8>(5, 0).unwrap().records,
            fast[0].records
        );
    }

    #[test]
    fn augmentation_depends_on_batch_not_on_order() {
        // Without shuffling, the same records at the same index get the same draws in every
        // run, and different draws in another epoch.
        let l = loader(64, 16, false, false, Augment::standard());
        let a = l.batch::<u8>(0, 1).unwrap();
        let b = l.batch::<u8>(0, 1).unwrap();
        let c = l.batch::<u8>(1, 1).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.records, c.records);
        assert_ne!(a.x, c.x);
        // Augmented images differ from the originals for some images but keep the label.
        let plain = loader(64, 16, false, false, Augment::none())
            .batch::<u8>(0, 1)
            .unwrap();
        assert_ne!(a.x, plain.x);
        assert_eq!(a.labels, plain.labels);
    }

    #[test]
    fn resume_mid_epoch() {
        let l = loader(150, 16, true, false, Augment::standard());
        let full: Vec<MiniBatch<f64>> = l.epoch(4).collect();
        for start in [0, 1, 5, 9] {
            let resumed: Vec<MiniBatch<f64>> = l.epoch_from(4, start).collect();
            assert_eq!(resumed.len(), full.len() - start);
            assert_eq!(&full[start..], &resumed[..], "start {start}");
        }
        assert_eq!(l.epoch_from::<f32>(4, 10).count(), 0);
        assert_eq!(l.epoch_from::<f32>(4, 1000).len(), 0);
    }

    #[test]
    fn early_drop_stops_the_worker() {
        // A large dataset with a shallow queue: the worker is blocked on a full channel when
        // the iterator is dropped, and must stop rather than prepare the whole epoch.
        let l = loader(4000, 8, true, false, Augment::standard()).with_prefetch(1);
        let start = std::time::Instant::now();
        for _ in 0..50 {
            let mut it = l.epoch::<f32>(0);
            assert!(it.next().is_some());
            drop(it);
        }
        // Never even started.
        for _ in 0..50 {
            drop(l.epoch::<f32>(1));
        }
        // Dropping a partly-consumed iterator joins the thread: nothing is left running.
        // 100 drops of a 500-batch epoch that kept running would take far longer.
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        // Iterating to the end and then past it is fine too.
        let mut it = loader(20, 8, false, false, Augment::none()).epoch::<u8>(0);
        assert_eq!(it.by_ref().count(), 3);
        assert!(it.next().is_none());
    }

    #[test]
    fn worker_threads_are_joined() {
        // Live threads of this process (Linux) whose name starts with `prefix`.
        fn live(prefix: &str) -> Option<usize> {
            let tasks = std::fs::read_dir("/proc/self/task").ok()?;
            Some(
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|name| name.starts_with(prefix))
                    .count(),
            )
        }
        // Epochs 900000.. name their workers "fm-load-e900000" ..., which no other test uses.
        let l = loader(2000, 4, true, false, Augment::standard()).with_prefetch(2);
        // At most one worker per live epoch; seen running at least once (the names work). Not
        // every time: on a loaded machine /proc can miss a thread for a moment (seen once in
        // CI under a concurrent build), which says nothing about joining.
        let mut seen = 0;
        for e in 900_000..900_020 {
            let mut it = l.epoch::<u8>(e);
            it.next();
            it.next();
            if let Some(n) = live(&format!("fm-load-e{e}")) {
                assert!(n <= 1, "{n} workers of epoch {e} are running");
                seen += n;
            } else {
                seen += 1; // no /proc: nothing to check
            }
        }
        assert!(seen > 0, "no epoch worker was ever seen running");
        if let Some(n) = live("fm-load-e9000") {
            assert_eq!(n, 0, "every dropped iterator joined its worker");
        }
    }

    #[test]
    fn constructor_errors() {
        let d = data(10);
        let new = |bs, drop_last| Loader::new(d.clone(), bs, true, drop_last, Augment::none(), 0);
        assert_eq!(new(0, false).unwrap_err(), LoaderError::ZeroBatchSize);
        let err = new(11, true).unwrap_err();
        assert_eq!(
            err,
            LoaderError::NoFullBatch {
                batch_size: 11,
                records: 10
            }
        );
        assert!(err.to_string().contains("batch size 11"), "{err}");
        assert!(new(11, false).is_ok());
        let empty = Loader::new(Arc::default(), 4, true, false, Augment::none(), 0);
        assert_eq!(empty.unwrap_err(), LoaderError::Empty);
        let mut bad = (*d).clone();
        bad.pixels.truncate(5);
        let err = Loader::new(Arc::new(bad), 4, true, false, Augment::none(), 0).unwrap_err();
        assert!(matches!(err, LoaderError::Malformed(_)), "{err:?}");
    }
}
