//! Where a network's parameters come from: a checkpoint, seen through [`Weights`], or seeded
//! random values ([`RandomWeights`]) for benchmarks and shape tests of full-size
//! configurations without a multi-gigabyte file.
//!
//! The UNet, the VAE and their blocks load through the [`WeightSource`] trait: a loader walks
//! the module tree (`push("down_blocks").index(0)`) and asks each layer's tensors by name and
//! shape, exactly as it does from a [`WeightStore`](crate::weights::WeightStore). A random
//! source answers every request with values of the requested shape, so a network of any
//! configuration can be built with no file at all.

use crate::backend::DType;
use crate::error::Result;
use crate::weights::{HostData, HostTensor, WeightPath, Weights};

/// A tree of named tensors a network loads its parameters from.
pub trait WeightSource: Clone {
    /// The source one name segment down (`"conv1"`, `"resnets"`).
    #[must_use]
    fn push(&self, name: &str) -> Self;

    /// The source one list index down (`.index(0)` after `.push("down_blocks")`).
    #[must_use]
    fn index(&self, i: usize) -> Self;

    /// The tensor `name` under the prefix, which must have shape `shape`.
    ///
    /// # Errors
    /// A missing tensor, one of another shape, or of a dtype that cannot be loaded (see
    /// [`Weights::get`]).
    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor>;

    /// The prefix, for error messages.
    fn describe(&self) -> String;
}

impl WeightSource for Weights<'_> {
    fn push(&self, name: &str) -> Self {
        Weights::push(self, name)
    }

    fn index(&self, i: usize) -> Self {
        Weights::index(self, i)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        Weights::get(self, name, shape)
    }

    fn describe(&self) -> String {
        let path = self.path().as_str();
        if path.is_empty() {
            "weights".into()
        } else {
            path.to_owned()
        }
    }
}

/// What [`WatchedSource`] calls for each weight: its full key and its tensor.
type Watch = std::sync::Arc<dyn Fn(&str, &HostTensor) + Send + Sync>;

/// A [`WeightSource`] that calls `watch(key, tensor)` for every weight it hands out, with
/// the weight's full key as a checkpoint names it (`down_blocks.0.resnets.0.conv1.weight`):
/// to record what a network loads, or to name its weights on a training tape.
#[derive(Clone)]
pub struct WatchedSource<S: WeightSource> {
    inner: S,
    path: WeightPath,
    watch: Watch,
}

impl<S: WeightSource> WatchedSource<S> {
    /// `inner`'s weights, each shown to `watch` as it is handed out.
    pub fn new(inner: S, watch: impl Fn(&str, &HostTensor) + Send + Sync + 'static) -> Self {
        WatchedSource {
            inner,
            path: WeightPath::root(),
            watch: std::sync::Arc::new(watch),
        }
    }
}

impl<S: WeightSource> WeightSource for WatchedSource<S> {
    fn push(&self, name: &str) -> Self {
        WatchedSource {
            inner: self.inner.push(name),
            path: self.path.push(name),
            watch: self.watch.clone(),
        }
    }

    fn index(&self, i: usize) -> Self {
        WatchedSource {
            inner: self.inner.index(i),
            path: self.path.index(i),
            watch: self.watch.clone(),
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.inner.get(name, shape)?;
        (self.watch)(self.path.push(name).as_str(), &t);
        Ok(t)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Seeded random parameters of whatever shape a network asks for.
///
/// Each tensor is drawn from its own generator, seeded by the source's seed and the tensor's
/// full key, so a network's values do not depend on the order it loads them in. Matrices and
/// kernels are uniform in `±1/sqrt(fan_in)` (PyTorch's default initialisation bound), norm
/// scales (1-D tensors named `weight`) are 1, biases uniform in `±0.02`: activations stay of
/// order one through a full-size network.
///
/// ```
/// use sd_models::nn::{RandomWeights, WeightSource};
///
/// let w = RandomWeights::new(7).push("conv_in");
/// let a = w.get("weight", &[8, 4, 3, 3])?;
/// assert_eq!(a.shape(), [8, 4, 3, 3]);
/// // The same key gives the same values.
/// assert_eq!(a, RandomWeights::new(7).push("conv_in").get("weight", &[8, 4, 3, 3])?);
/// # Ok::<(), sd_models::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RandomWeights {
    path: WeightPath,
    seed: u64,
    dtype: DType,
}

impl RandomWeights {
    /// A source of `f32` values seeded by `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        RandomWeights {
            path: WeightPath::root(),
            seed,
            dtype: DType::F32,
        }
    }

    /// The same source handing out tensors in `dtype` (`F16` halves the memory of a
    /// full-size network).
    #[must_use]
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
}

/// SplitMix64 (Steele, Lea & Flood, 2014): a fast generator, ample for test weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn next_signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

impl WeightSource for RandomWeights {
    fn push(&self, name: &str) -> Self {
        RandomWeights {
            path: self.path.push(name),
            ..self.clone()
        }
    }

    fn index(&self, i: usize) -> Self {
        RandomWeights {
            path: self.path.index(i),
            ..self.clone()
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let key = self.path.push(name);
        // FNV-1a of the key, mixed with the seed: stable across platforms and Rust versions.
        let hash = key
            .as_str()
            .bytes()
            .fold(0xCBF2_9CE4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
            });
        let mut rng = SplitMix64(hash ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match shape {
            [_] if name == "weight" => vec![1.0; n],
            [_] => (0..n).map(|_| 0.02 * rng.next_signed()).collect(),
            _ => {
                let fan_in: usize = shape.iter().skip(1).product();
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                (0..n).map(|_| bound * rng.next_signed()).collect()
            }
        };
        let data = match self.dtype {
            DType::F16 => HostData::F16(values.into_iter().map(half::f16::from_f32).collect()),
            DType::BF16 => HostData::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
            _ => HostData::F32(values),
        };
        HostTensor::new(shape.to_vec(), data)
    }

    fn describe(&self) -> String {
        format!("random weights at {:?}", self.path.as_str())
    }
}
