//! Safetensors weight loading, independent of the compute backend.
//!
//! Weights are read from memory-mapped safetensors files (one file, or shards listed by a
//! `*.safetensors.index.json`, in the layouts of diffusers and transformers component folders
//! with their `fp16` variants) and handed out as [`HostTensor`]s, which a backend uploads.
//! The behaviour follows PyTorch's `load_state_dict(strict=True)` as diffusers'
//! `ModelMixin.from_pretrained` uses it: every tensor is checked against the shape the
//! network expects and named on failure, and keys the network never asked for are reported
//! (an error in strict mode).
//!
//! | item | what |
//! |---|---|
//! | [`WeightPath`] | a key built from typed segments (`push("resnets").index(0)`) |
//! | [`Weights`] | the store at a prefix: what a layer loads its `weight` and `bias` from |
//! | [`WeightStore`], [`OpenOptions`] | a set of files as one checkpoint: lookup, checks, used keys, renaming |
//! | [`Derived`] | a key that is a view of a stored tensor (rows along dim 0, a transpose) |
//! | [`compvis`] | single-file checkpoints with the original CompVis key names, mapped to diffusers' |
//! | [`WeightFile`] | one memory-mapped, validated safetensors file |
//! | [`find_weights`], [`Variant`] | which file(s) of a component folder to open |
//! | [`HostTensor`], [`DType`], [`LoadDType`] | host tensors in `f32`, `f16` or `bf16` |
//!
//! `F32`, `F16` and `BF16` tensors load, converted to `f32` ([`LoadDType::F32`], the default)
//! or kept as stored ([`LoadDType::Stored`]); any other dtype is an error naming the key and
//! the file when it is loaded. Other key layouts (the original CompVis single-file names) are
//! mapped to the diffusers names once, at open time, by [`OpenOptions::rename`],
//! [`OpenOptions::derive`] and [`OpenOptions::reshape`]: [`compvis::SingleFile`] does so for
//! Stable Diffusion 1.x and 2.x checkpoints.
//!
//! # Example
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("sd-models-doc-weights-mod-{}", std::process::id()));
//! # let unet = dir.join("unet");
//! # std::fs::create_dir_all(&unet)?;
//! # let bytes: Vec<u8> = (0..8).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
//! # let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![8], &bytes)?;
//! # safetensors::serialize_to_file([("conv_in.bias", view)], None, &unet.join("diffusion_pytorch_model.fp16.safetensors"))?;
//! use sd_models::weights::{DType, LoadDType, OpenOptions, Variant};
//!
//! // The fp16 files of `unet/` if present, else the default ones; kept in half precision.
//! let store = OpenOptions::new()
//!     .dtype(LoadDType::Stored)
//!     .strict(true)
//!     .open_folder(&unet, &[Variant::Fp16, Variant::Default])?;
//! let bias = store.root().push("conv_in").get("bias", &[8])?;
//! assert_eq!(bias.dtype(), DType::F16);
//! assert_eq!(bias.to_f32_vec(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
//! store.finish()?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod compvis;
mod derive;
mod file;
mod folder;
mod path;
mod scope;
mod store;
mod tensor;

pub use derive::Derived;
pub use file::{TensorInfo, WeightFile};
pub use folder::{Variant, find_weights};
pub use path::WeightPath;
pub use scope::Weights;
pub use store::{OpenOptions, WeightStore};
pub(crate) use tensor::decode;
pub use tensor::{DType, HostData, HostTensor, LoadDType};
