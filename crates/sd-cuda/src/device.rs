//! The backend object: one device, one stream, one cuBLAS handle, a buffer pool, and the
//! kernels loaded into the device's context on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;
use sd_models::backend::{BackendBase, DType};

use crate::error::{CudaError, Result};
use crate::kernels::{self, Arch, Float, Image, Kernel, Unit, geometry};
use crate::loader;
use crate::pool::{Pool, PoolStats};
use crate::tensor::CudaTensor;

/// The device pointers of the arguments must point at buffers that outlive the launch's
/// work (tensors keep their buffers, and a buffer is reused only by later work on the same
/// stream), and the arguments must match the kernel's parameter list in order and type:
/// each call site is next to the kernel's signature in its comment.
macro_rules! launch {
    ($backend:expr, $kernel:expr, $cfg:expr, $($arg:ident),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let f = $backend.function($kernel)?;
        let mut b = $backend.stream().launch_builder(&f);
        $( b.arg(&$arg); )+
        // SAFETY: see the macro's documentation.
        unsafe { b.launch($cfg) }
            .map(|_| ())
            .map_err(|e| $crate::error::CudaError::driver("cuLaunchKernel", e))
    }};
}
pub(crate) use launch;

/// Tensors hold fewer than 2^31 elements, so the kernels index with 32-bit integers.
pub(crate) const MAX_ELEMENTS: usize = i32::MAX as usize;

/// How to build a [`CudaBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CudaOptions {
    /// The device ordinal.
    pub ordinal: usize,
    /// The storage type of tensors made by [`DataOps::upload`](sd_models::backend::DataOps)
    /// from f32 data: `F32` (the default) keeps them f32; `F16` or `BF16` converts on upload,
    /// so a whole network runs in half precision (with f32 accumulation) from f32 inputs.
    pub upload_dtype: DType,
}

impl CudaOptions {
    /// Device `ordinal`, f32 uploads.
    pub fn new(ordinal: usize) -> Self {
        CudaOptions {
            ordinal,
            upload_dtype: DType::F32,
        }
    }

    /// The same with another upload dtype.
    #[must_use]
    pub fn with_upload_dtype(mut self, dtype: DType) -> Self {
        self.upload_dtype = dtype;
        self
    }
}

/// The CUDA backend: implements [`sd_models::Backend`] with tensors in device memory.
///
/// Everything runs on one stream of one device; operations return as soon as their work is
/// enqueued, and [`DataOps::download`](sd_models::backend::DataOps::download) waits for it.
/// Kernels are compiled by NVRTC for the device's architecture on first use (once per
/// process, see [`CudaBackend::warm_up`]); device memory is pooled ([`PoolStats`]).
///
/// Construction checks everything the backend needs (the driver, NVRTC, cuBLAS, a device of
/// compute capability 8.0 or newer, a kernel that compiles and loads) and returns a
/// [`CudaError`] naming what is missing:
///
/// ```
/// match sd_cuda::CudaBackend::new(0) {
///     Ok(gpu) => println!("running on {}", gpu.device_name()),
///     Err(e) => println!("no CUDA backend here: {e}"),
/// }
/// ```
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    // Dropped first: functions and modules, then the handle and the pool, then the stream
    // and the context they live in.
    functions: Mutex<HashMap<Kernel, CudaFunction>>,
    modules: Mutex<HashMap<Unit, Arc<CudaModule>>>,
    blas: Mutex<CudaBlas>,
    pool: Arc<Pool>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    ordinal: usize,
    arch: Arch,
    device_name: String,
    sm_count: u32,
    max_shared_optin: u32,
    upload_dtype: DType,
}

impl Drop for Inner {
    /// Waits for the queued work before the fields go: the modules are unloaded first, and a
    /// kernel still queued must not outlive its code. An error here has nowhere to go (it
    /// was, or will be, reported by the call that queued the work).
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.inner.ordinal)
            .field("device", &self.inner.device_name)
            .field("arch", &self.inner.arch)
            .field("upload_dtype", &self.inner.upload_dtype)
            .finish()
    }
}

fn attribute(ctx: &CudaContext, a: CUdevice_attribute) -> Result<u32> {
    let v = ctx
        .attribute(a)
        .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
    Ok(u32::try_from(v).unwrap_or(0))
}

impl CudaBackend {
    /// The backend on device `ordinal`, uploading f32 as f32.
    ///
    /// # Errors
    /// As [`CudaBackend::with_options`].
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_options(CudaOptions::new(ordinal))
    }

    /// The backend as `options` say.
    ///
    /// # Errors
    /// [`CudaError::DriverNotFound`], [`CudaError::NvrtcNotFound`],
    /// [`CudaError::CublasNotFound`] for a missing library; [`CudaError::Version`] for one too
    /// old (or NVRTC newer than the driver); [`CudaError::NoDevice`]; [`CudaError::ArchTooOld`]
    /// before sm_80; [`CudaError::Compile`] or [`CudaError::Driver`] when a first kernel does
    /// not compile or load; [`CudaError::Unsupported`] for an upload dtype without kernels.
    pub fn with_options(options: CudaOptions) -> Result<Self> {
        use cudarc::driver::result as dr;
        use cudarc::driver::sys::cudaError_enum;

        let driver = loader::driver_version()?;
        let (nvrtc_major, nvrtc_minor) = loader::nvrtc_version()?;
        loader::check_cublas()?;
        // NVRTC's code needs a driver of at least its major version.
        if nvrtc_major > driver / 1000 {
            return Err(CudaError::Version {
                what: "CUDA driver",
                found: loader::cuda_version_string(driver),
                needed: format!(
                    "{nvrtc_major}.0 or newer to run code from NVRTC {nvrtc_major}.{nvrtc_minor} \
                     (or use an NVRTC of the driver's version)"
                ),
            });
        }
        if Float::of(options.upload_dtype).is_none() {
            return Err(CudaError::Unsupported(format!(
                "upload dtype {}",
                options.upload_dtype
            )));
        }
        let ordinal = options.ordinal;
        match dr::init() {
            Ok(()) => {}
            Err(e) if e.0 == cudaError_enum::CUDA_ERROR_NO_DEVICE => {
                return Err(CudaError::NoDevice { ordinal, count: 0 });
            }
            Err(e) => return Err(CudaError::driver("cuInit", e)),
        }
        let count =
            dr::device::get_count().map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
        // One stream, no cross-stream events: every buffer is made after this call.
        // SAFETY: nothing is allocated yet; all work of this backend goes to one stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
        let arch = Arch {
            major: u32::try_from(major).unwrap_or(0),
            minor: u32::try_from(minor).unwrap_or(0),
        };
        if arch < Arch::SM80 {
            return Err(CudaError::ArchTooOld { ordinal, arch });
        }
        let device_name = ctx
            .name()
            .map_err(|e| CudaError::driver("cuDeviceGetName", e))?;
        let sm_count = attribute(
            &ctx,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?;
        let max_shared_optin = attribute(
            &ctx,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::driver("cuStreamCreate", e))?;
        let blas =
            CudaBlas::new(Arc::clone(&stream)).map_err(|e| CudaError::cublas("cublasCreate", e))?;
        let backend = CudaBackend {
            inner: Arc::new(Inner {
                functions: Mutex::new(HashMap::new()),
                modules: Mutex::new(HashMap::new()),
                blas: Mutex::new(blas),
                pool: Arc::new(Pool::new(Arc::clone(&stream))),
                stream,
                ctx,
                ordinal,
                arch,
                device_name,
                sm_count: sm_count.max(1),
                max_shared_optin,
                upload_dtype: options.upload_dtype,
            }),
        };
        // A first kernel through the whole chain (NVRTC, the driver's loader), so that a
        // broken pairing is an error here rather than in the first operation.
        backend.function(Kernel::UpsampleNearest2x(kernels::Bits::B32))?;
        Ok(backend)
    }

    /// The device's architecture.
    pub fn arch(&self) -> Arch {
        self.inner.arch
    }

    /// The device's name ("NVIDIA H100 80GB HBM3").
    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// The storage type of tensors uploaded from f32 data.
    pub fn upload_dtype(&self) -> DType {
        self.inner.upload_dtype
    }

    /// Waits for all enqueued work.
    ///
    /// # Errors
    /// [`CudaError::Driver`] when the work failed (an error from an earlier kernel surfaces
    /// here).
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }

    /// Compiles (once per process) and loads every kernel module, so that no operation waits
    /// for NVRTC later.
    ///
    /// # Errors
    /// As the first use of a kernel: [`CudaError::Compile`], [`CudaError::Driver`].
    pub fn warm_up(&self) -> Result<()> {
        let kernels = Kernel::all();
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let next = std::sync::atomic::AtomicUsize::new(0);
        // NVRTC compiles one program per thread; the heavy units run side by side.
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.min(kernels.len()))
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&k) = kernels.get(i) else {
                                return Ok(());
                            };
                            self.function(k)?;
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(CudaError::Unsupported(
                            "a kernel-loading thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// The memory pool's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }

    /// Frees the device memory cached for reuse (live tensors keep theirs).
    pub fn empty_cache(&self) {
        self.inner.pool.release_cached();
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))
    }

    pub(crate) fn with_blas<T>(&self, f: impl FnOnce(&CudaBlas) -> Result<T>) -> Result<T> {
        let blas = self
            .inner
            .blas
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.bind()?;
        f(&blas)
    }

    fn module(&self, unit: Unit) -> Result<Arc<CudaModule>> {
        if let Some(module) = self
            .inner
            .modules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&unit)
        {
            return Ok(Arc::clone(module));
        }
        // Compiled without holding the lock, so that warm_up compiles units in parallel.
        let image = kernels::image(unit, self.inner.arch)?;
        let ptx = match &*image {
            Image::Cubin(bin) => Ptx::from_binary(bin.clone()),
            Image::Ptx(text) => Ptx::from_src(text.clone()),
        };
        let module = self
            .inner
            .ctx
            .load_module(ptx)
            .map_err(|e| CudaError::driver("cuModuleLoadData", e))?;
        let mut modules = self
            .inner
            .modules
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Another thread may have loaded it meanwhile: keep the first.
        Ok(Arc::clone(modules.entry(unit).or_insert(module)))
    }

    /// The loaded kernel (loading its module on first use).
    pub(crate) fn function(&self, k: Kernel) -> Result<CudaFunction> {
        if let Some(f) = self
            .inner
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&k)
        {
            return Ok(f.clone());
        }
        let module = self.module(k.unit())?;
        self.bind()?;
        let f = module
            .load_function(&k.name())
            .map_err(|e| CudaError::driver("cuModuleGetFunction", e))?;
        let smem = k.dynamic_shared_bytes();
        if smem > 48 * 1024 {
            if smem > self.inner.max_shared_optin {
                return Err(CudaError::Unsupported(format!(
                    "{} needs {smem} bytes of shared memory; this device allows {}",
                    k.name(),
                    self.inner.max_shared_optin
                )));
            }
            self.bind()?;
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(smem).unwrap_or(i32::MAX),
            )
            .map_err(|e| CudaError::driver("cuFuncSetAttribute", e))?;
        }
        self.inner
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(k, f.clone());
        Ok(f)
    }

    /// A new tensor (uninitialised) of `shape` and `dtype`.
    pub(crate) fn alloc(&self, shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        let n = checked_len(shape)?;
        let buf = self.inner.pool.alloc(n * dtype.size_in_bytes())?;
        Ok(CudaTensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A scratch f32 buffer of `n` elements, as a tensor.
    pub(crate) fn scratch_f32(&self, n: usize) -> Result<CudaTensor> {
        self.alloc(&[n], DType::F32)
    }

    /// Blocks for a one-dimensional grid-stride loop over `n` elements: enough to fill the
    /// device, few enough that the stride stays far below 2^31.
    pub(crate) fn grid_1d(&self, n: usize) -> u32 {
        let blocks = n.div_ceil(geometry::THREADS as usize);
        let cap = self.inner.sm_count as usize * 16;
        u32::try_from(blocks.clamp(1, cap)).unwrap_or(1)
    }

    /// A one-dimensional launch over `n` elements.
    pub(crate) fn cfg_1d(&self, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid_1d(n), 1, 1),
            block_dim: (geometry::THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Copies host data into a tensor's buffer.
    pub(crate) fn upload_raw<T>(&self, dst: &CudaTensor, src: &[T]) -> Result<()> {
        if std::mem::size_of_val(src) > dst.buf.bytes() {
            return Err(CudaError::Unsupported(
                "upload larger than its buffer".into(),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the buffer holds at least size_of_val(src) bytes (checked); the copy is
        // ordered on the backend's stream; pageable source memory is staged before return.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr(), src, self.stream().cu_stream())
        }
        .map_err(|e| CudaError::driver("cuMemcpyHtoDAsync", e))
    }

    /// Copies a tensor's first `dst.len()` elements to the host and waits.
    pub(crate) fn download_raw<T>(&self, src: &CudaTensor, dst: &mut [T]) -> Result<()> {
        if std::mem::size_of_val(dst) > src.buf.bytes() {
            return Err(CudaError::Unsupported(
                "download larger than its buffer".into(),
            ));
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the buffer holds at least size_of_val(dst) bytes (checked); the stream is
        // synchronised before `dst` is read.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, src.ptr(), self.stream().cu_stream())
        }
        .map_err(|e| CudaError::driver("cuMemcpyDtoHAsync", e))?;
        self.synchronize()
    }

    /// Sets a tensor's bytes to zero.
    pub(crate) fn zero(&self, t: &CudaTensor) -> Result<()> {
        let bytes = t.len() * t.dtype.size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the tensor's buffer holds `bytes` bytes; ordered on the stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(t.ptr(), 0, bytes, self.stream().cu_stream())
        }
        .map_err(|e| CudaError::driver("cuMemsetD8Async", e))
    }

    /// The tensor in `dtype` (itself when it already is).
    pub(crate) fn to_dtype(&self, t: &CudaTensor, dtype: DType) -> Result<CudaTensor> {
        if t.dtype == dtype {
            return Ok(t.clone());
        }
        let (from, to) = (float(t.dtype)?, float(dtype)?);
        let out = self.alloc(&t.shape, dtype)?;
        let n = t.len();
        if n > 0 {
            let (o, x, n32) = (out.ptr(), t.ptr(), len_u32(n)?);
            launch!(self, Kernel::Cast { from, to }, self.cfg_1d(n), o, x, n32)?;
        }
        Ok(out)
    }
}

/// The kernel type of a dtype.
pub(crate) fn float(dtype: DType) -> Result<Float> {
    Float::of(dtype).ok_or_else(|| CudaError::Unsupported(format!("dtype {dtype}")))
}

/// The element count of `shape`, if a tensor of it fits the 32-bit indexing of the kernels.
pub(crate) fn checked_len(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            CudaError::Unsupported(format!(
                "a tensor of shape {shape:?} has more than 2^31 - 1 elements"
            ))
        })
}

/// `n` as a kernel's u32 argument (callers have bounded it by [`MAX_ELEMENTS`]).
pub(crate) fn len_u32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| CudaError::Unsupported(format!("{n} elements is past 2^32")))
}

/// The promoted dtype of two operands: the same, or f32 for any mix.
pub(crate) fn promote(a: DType, b: DType) -> DType {
    if a == b { a } else { DType::F32 }
}

impl BackendBase for CudaBackend {
    type Tensor = CudaTensor;

    fn name(&self) -> String {
        format!("cuda:{}", self.inner.ordinal)
    }

    fn shape<'a>(&self, tensor: &'a CudaTensor) -> &'a [usize] {
        &tensor.shape
    }

    fn dtype(&self, tensor: &CudaTensor) -> DType {
        tensor.dtype
    }
}
