//! Data movement for the CPU backend.

use std::borrow::Cow;

use half::{bf16, f16};
use ndarray::{ArrayD, Axis, IxDyn, Slice};

use super::{CpuBackend, CpuData, CpuTensor, pooled, pooled_with};
use crate::backend::{DType, DataOps, HalfData};
use crate::error::{Error, Result};

fn check_len(op: &'static str, shape: &[usize], len: usize) -> Result<()> {
    let expected: usize = shape.iter().product();
    if expected == len {
        Ok(())
    } else {
        Err(Error::Shape {
            op,
            expected: format!("{expected} values for shape {shape:?}"),
            found: format!("{len} values"),
        })
    }
}

impl DataOps for CpuBackend {
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        check_len("from_f32", shape, data.len())?;
        CpuTensor::from_vec(shape, super::pool::copy_of(data))
    }

    fn upload_half(&self, data: HalfData<'_>, shape: &[usize]) -> Result<CpuTensor> {
        let shape_error = |_| Error::Shape {
            op: "from_half",
            expected: format!("{} values", shape.iter().product::<usize>()),
            found: "another count".into(),
        };
        let data = match data {
            HalfData::F16(d) => {
                check_len("from_half", shape, d.len())?;
                CpuData::F16(
                    ArrayD::from_shape_vec(IxDyn(shape), d.to_vec())
                        .map_err(shape_error)?
                        .into_shared(),
                )
            }
            HalfData::BF16(d) => {
                check_len("from_half", shape, d.len())?;
                CpuData::BF16(
                    ArrayD::from_shape_vec(IxDyn(shape), d.to_vec())
                        .map_err(shape_error)?
                        .into_shared(),
                )
            }
        };
        Ok(CpuTensor { data })
    }

    fn download(&self, tensor: &CpuTensor) -> Result<Vec<f32>> {
        let a = tensor.to_f32_array();
        // A contiguous tensor (nearly all are) is one copy; a strided view is walked.
        Ok(match a.as_slice() {
            Some(values) => values.to_vec(),
            None => a.iter().copied().collect(),
        })
    }

    fn upload_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<CpuTensor> {
        check_len("from_f32", shape, data.len())?;
        CpuTensor::from_vec(shape, data)
    }

    fn host_values<'a>(&self, tensor: &'a CpuTensor) -> Result<Cow<'a, [f32]>> {
        if let CpuData::F32(a) = &tensor.data
            && let Some(values) = a.as_slice()
        {
            return Ok(Cow::Borrowed(values));
        }
        self.download(tensor).map(Cow::Owned)
    }

    fn reshape(&self, tensor: &CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        let from = tensor.shape();
        if from.iter().product::<usize>() != shape.iter().product::<usize>() {
            return Err(Error::Shape {
                op: "reshape",
                expected: format!("{} values for {shape:?}", shape.iter().product::<usize>()),
                found: format!("{from:?}"),
            });
        }
        let reshape_error = |_| Error::Shape {
            op: "reshape",
            expected: format!("{shape:?}"),
            found: format!("{from:?}"),
        };
        let data = match &tensor.data {
            CpuData::F32(a) => CpuData::F32(
                a.clone()
                    .into_shape_with_order(IxDyn(shape))
                    .map_err(reshape_error)?,
            ),
            CpuData::F16(a) => CpuData::F16(
                a.clone()
                    .into_shape_with_order(IxDyn(shape))
                    .map_err(reshape_error)?,
            ),
            CpuData::BF16(a) => CpuData::BF16(
                a.clone()
                    .into_shape_with_order(IxDyn(shape))
                    .map_err(reshape_error)?,
            ),
            CpuData::Packed(_) => CpuData::F32(
                tensor
                    .to_f32_array()
                    .into_shape_with_order(IxDyn(shape))
                    .map_err(reshape_error)?,
            ),
        };
        Ok(CpuTensor { data })
    }

    fn permute(&self, tensor: &CpuTensor, axes: &[usize]) -> Result<CpuTensor> {
        let shape = tensor.shape();
        let mut seen = vec![false; shape.len()];
        let valid = axes.len() == shape.len()
            && axes
                .iter()
                .all(|&a| a < seen.len() && !std::mem::replace(&mut seen[a], true));
        if !valid {
            return Err(Error::Shape {
                op: "permute",
                expected: format!("a permutation of 0..{}", shape.len()),
                found: format!("{axes:?}"),
            });
        }
        let data = match &tensor.data {
            CpuData::F32(a) => return pooled(a.view().permuted_axes(IxDyn(axes)), "permute"),
            CpuData::F16(a) => CpuData::F16(
                a.view()
                    .permuted_axes(IxDyn(axes))
                    .as_standard_layout()
                    .into_owned()
                    .into_shared(),
            ),
            CpuData::BF16(a) => CpuData::BF16(
                a.view()
                    .permuted_axes(IxDyn(axes))
                    .as_standard_layout()
                    .into_owned()
                    .into_shared(),
            ),
            CpuData::Packed(_) => {
                return pooled(
                    tensor.to_f32_array().view().permuted_axes(IxDyn(axes)),
                    "permute",
                );
            }
        };
        Ok(CpuTensor { data })
    }

    fn slice(
        &self,
        tensor: &CpuTensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> Result<CpuTensor> {
        let shape = tensor.shape();
        if axis >= shape.len() || start.checked_add(len).is_none_or(|end| end > shape[axis]) {
            return Err(Error::Shape {
                op: "slice",
                expected: format!("axis < {} and {start}+{len} <= its size", shape.len()),
                found: format!("axis {axis} of {shape:?}"),
            });
        }
        let s = Slice::from(start..start + len);
        let data = match &tensor.data {
            CpuData::F32(a) => return pooled(a.slice_axis(Axis(axis), s), "slice"),
            CpuData::F16(a) => CpuData::F16(
                a.slice_axis(Axis(axis), s)
                    .as_standard_layout()
                    .into_owned()
                    .into_shared(),
            ),
            CpuData::BF16(a) => CpuData::BF16(
                a.slice_axis(Axis(axis), s)
                    .as_standard_layout()
                    .into_owned()
                    .into_shared(),
            ),
            CpuData::Packed(_) => {
                return pooled(tensor.to_f32_array().slice_axis(Axis(axis), s), "slice");
            }
        };
        Ok(CpuTensor { data })
    }

    fn concat(&self, tensors: &[&CpuTensor], axis: usize) -> Result<CpuTensor> {
        let Some(first) = tensors.first() else {
            return Err(Error::Shape {
                op: "concat",
                expected: "at least one tensor".into(),
                found: "none".into(),
            });
        };
        let rank = first.shape().len();
        let compatible = axis < rank
            && tensors.iter().all(|t| {
                let s = t.shape();
                s.len() == rank && (0..rank).all(|i| i == axis || s[i] == first.shape()[i])
            });
        if !compatible {
            return Err(Error::Shape {
                op: "concat",
                expected: format!("tensors equal but along axis {axis}"),
                found: format!(
                    "{:?}",
                    tensors
                        .iter()
                        .map(|t| t.shape().to_vec())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let arrays: Vec<_> = tensors.iter().map(|t| t.to_f32_array()).collect();
        let mut shape = first.shape().to_vec();
        shape[axis] = arrays.iter().map(|a| a.shape()[axis]).sum();
        pooled_with(&shape, "concat", |mut dst| {
            let mut at = 0;
            for a in &arrays {
                let len = a.shape()[axis];
                dst.slice_axis_mut(Axis(axis), Slice::from(at..at + len))
                    .assign(a);
                at += len;
            }
        })
    }

    fn cast(&self, tensor: &CpuTensor, dtype: DType) -> Result<CpuTensor> {
        let f = tensor.to_f32_array();
        let data = match dtype {
            DType::F32 => CpuData::F32(f),
            DType::F16 => CpuData::F16(f.mapv(f16::from_f32).into_shared()),
            DType::BF16 => CpuData::BF16(f.mapv(bf16::from_f32).into_shared()),
        };
        Ok(CpuTensor { data })
    }
}
