//! Training: the backward half of the networks, an optimiser and its schedules.
//!
//! The design (see `docs/training.md`): the networks' forward code stays as it is, and a
//! tape-based automatic differentiation layer over the [`Backend`](crate::Backend) records
//! each operation with what its backward rule needs. The rules are written once, in terms of
//! the backward primitives of [`grad`] (the gradients of a convolution, a group norm, a
//! linear layer, attention, ...), which a backend provides: the CPU backend through the
//! functions here, on the same packed GEMM as its forward kernels; a GPU backend with its own
//! kernels later. This module holds the tape ([`autodiff`]), those primitives, the optimiser
//! ([`optim`]) and the DDPM trainer ([`ddpm`]).
//!
//! Every primitive is checked against PyTorch's autograd on the cases of
//! `fixtures/training` (`tools/fixtures/training_fixtures.py`), and the optimiser against
//! `torch.optim.AdamW`.

pub mod autodiff;
pub mod ddpm;
pub mod grad;
pub mod optim;
