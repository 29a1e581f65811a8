//! Reverse-mode automatic differentiation over any [`Backend`]: [`Autodiff`] is itself a
//! backend, whose tensors ([`Var`]) carry a node of a tape. The networks run on it unchanged;
//! every operation computes its value with the wrapped backend and records the rule that
//! turns its output's gradient into its inputs' gradients. [`Autodiff::backward`] then walks
//! the tape in reverse, once, freeing each node as it goes.
//!
//! Every upload is a leaf whose gradient is kept: the network's weights (named while a
//! network loads through [`Autodiff::named_source`]) and the inputs. Weights are never packed
//! (`prepare_*` keep them as they are), since training changes them at every step.
//!
//! The rules call the primitives of [`super::grad`] on the host (download, compute,
//! upload): correct on every backend. On the CPU nothing is copied: the rules borrow the
//! tensors' values ([`DataOps::host_values`]) and the gradients become tensors as they are
//! ([`DataOps::upload_vec`]). Each rule is timed ([`Gradients::profile`]). Operations a
//! UNet2DModel does not use compute their value but have no rule yet: a gradient that
//! reaches one is an error naming it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::backend::{
    ActivationOps, AttentionMask, AttentionOps, Backend, BackendBase, Conv2dParams, ConvOps, DType,
    DataOps, ElementwiseOps, GeluApproximation, HalfData, MatmulOps, NormOps, ResampleOps,
};
use crate::error::{Error, Result};
use crate::nn::source::{WatchedSource, WeightSource};
use crate::train::grad::{self, AttentionShape, ConvShape, GroupNormShape};

type Rule<B> = Box<
    dyn FnOnce(&B, &<B as BackendBase>::Tensor) -> Result<Vec<Option<<B as BackendBase>::Tensor>>>
        + Send
        + Sync,
>;

struct Node<B: Backend> {
    parents: Vec<Option<usize>>,
    /// The operation's name and its rule; `None` for a leaf.
    rule: Option<(&'static str, Rule<B>)>,
    name: Option<String>,
}

struct Tape<B: Backend> {
    nodes: Vec<Node<B>>,
    /// The name the next upload takes (set by [`Autodiff::named_source`]).
    pending_name: Option<String>,
}

/// A backend that records what it computes for [`backward`](Self::backward).
pub struct Autodiff<B: Backend> {
    inner: B,
    tape: Arc<Mutex<Tape<B>>>,
}

impl<B: Backend> Clone for Autodiff<B> {
    fn clone(&self) -> Self {
        Autodiff {
            inner: self.inner.clone(),
            tape: self.tape.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Autodiff<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Autodiff({})", self.inner.name())
    }
}

/// A tensor of [`Autodiff`]: a value of the wrapped backend and its node on the tape.
#[derive(Debug, Clone)]
pub struct Var<T> {
    value: T,
    id: usize,
}

impl<T> Var<T> {
    /// The value.
    pub fn value(&self) -> &T {
        &self.value
    }
}

/// The gradients [`Autodiff::backward`] found for the leaves.
#[derive(Debug)]
pub struct Gradients<T> {
    by_id: HashMap<usize, T>,
    names: Vec<(String, usize)>,
    profile: Vec<RuleTime>,
}

/// The time the backward rules of one kind of operation took in a
/// [`backward`](Autodiff::backward) pass (adding gradients that meet at a value is
/// `"accumulate"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleTime {
    /// The operation (the backend method's name: `"conv2d"`, `"group_norm_silu"`, ...).
    pub op: &'static str,
    /// Rules run.
    pub calls: usize,
    /// Their wall time.
    pub time: std::time::Duration,
}

impl<T> Gradients<T> {
    /// The gradient of a leaf (a weight or an input), if the output depends on it.
    pub fn of(&self, var: &Var<T>) -> Option<&T> {
        self.by_id.get(&var.id)
    }

    /// The named leaves' gradients (the weights of a network loaded through
    /// [`Autodiff::named_source`]), in load order; a weight the output does not depend on is absent.
    pub fn named(&self) -> impl Iterator<Item = (&str, &T)> {
        self.names
            .iter()
            .filter_map(|(n, id)| self.by_id.get(id).map(|g| (n.as_str(), g)))
    }

    /// Where the backward pass spent its time, by operation, longest first.
    pub fn profile(&self) -> &[RuleTime] {
        &self.profile
    }
}

fn no_rule(op: &'static str) -> Error {
    Error::Config {
        what: "autodiff".into(),
        message: format!("{op} has no backward rule yet (a gradient reached it)"),
    }
}

impl<B: Backend> Autodiff<B> {
    /// Records the operations run on it, computing them with `inner`.
    pub fn new(inner: B) -> Self {
        Autodiff {
            inner,
            tape: Arc::new(Mutex::new(Tape {
                nodes: Vec::new(),
                pending_name: None,
            })),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn tape(&self) -> std::sync::MutexGuard<'_, Tape<B>> {
        self.tape.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.tape().nodes.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, parents: Vec<Option<usize>>, rule: Option<(&'static str, Rule<B>)>) -> usize {
        let mut tape = self.tape();
        // A name set by `named_source` belongs to the upload that follows it; any other
        // operation in between means the weight was not uploaded, and the name is dropped.
        let name = tape.pending_name.take().filter(|_| rule.is_none());
        tape.nodes.push(Node {
            parents,
            rule,
            name,
        });
        tape.nodes.len() - 1
    }

    fn leaf(&self, value: B::Tensor) -> Var<B::Tensor> {
        let id = self.push(Vec::new(), None);
        Var { value, id }
    }

    fn op(
        &self,
        name: &'static str,
        value: B::Tensor,
        parents: &[&Var<B::Tensor>],
        rule: Rule<B>,
    ) -> Var<B::Tensor> {
        let id = self.push(
            parents.iter().map(|p| Some(p.id)).collect(),
            Some((name, rule)),
        );
        Var { value, id }
    }

    /// A layer's node: parents the input, the weight and the bias if there is one.
    fn layer_op(
        &self,
        name: &'static str,
        value: B::Tensor,
        x: &Var<B::Tensor>,
        weight: &Var<B::Tensor>,
        bias: Option<&Var<B::Tensor>>,
        rule: Rule<B>,
    ) -> Var<B::Tensor> {
        let mut parents = vec![x, weight];
        parents.extend(bias);
        self.op(name, value, &parents, rule)
    }

    /// Forgets everything recorded (the values stay valid but have no gradient).
    pub fn clear(&self) {
        let mut tape = self.tape();
        tape.nodes.clear();
        tape.pending_name = None;
    }

    /// A value of the wrapped backend as a leaf (an input).
    pub fn input(&self, value: B::Tensor) -> Var<B::Tensor> {
        self.leaf(value)
    }

    /// The gradients of `output`'s elements weighted by `seed` (of `output`'s shape; all
    /// ones for a scalar loss) with respect to every leaf, walking the tape once in reverse.
    /// The tape is consumed.
    ///
    /// # Errors
    /// An operation on the path without a backward rule; the backend's errors.
    pub fn backward(
        &self,
        output: &Var<B::Tensor>,
        seed: &B::Tensor,
    ) -> Result<Gradients<B::Tensor>> {
        let nodes = std::mem::take(&mut self.tape().nodes);
        let mut grads: Vec<Option<B::Tensor>> = (0..nodes.len()).map(|_| None).collect();
        if output.id >= nodes.len() {
            return Err(Error::Config {
                what: "autodiff".into(),
                message: "the output was not recorded on this tape".into(),
            });
        }
        grads[output.id] = Some(seed.clone());
        let mut out = Gradients {
            by_id: HashMap::new(),
            names: Vec::new(),
            profile: Vec::new(),
        };
        let mut times: HashMap<&'static str, RuleTime> = HashMap::new();
        let mut record = |op: &'static str, since: Instant| {
            let t = times.entry(op).or_insert(RuleTime {
                op,
                calls: 0,
                time: std::time::Duration::ZERO,
            });
            t.calls += 1;
            t.time += since.elapsed();
        };
        for (i, node) in nodes.into_iter().enumerate().rev() {
            if let Some(name) = &node.name {
                out.names.push((name.clone(), i));
            }
            let Some(g) = grads[i].take() else {
                continue;
            };
            let Some((op, rule)) = node.rule else {
                out.by_id.insert(i, g);
                continue;
            };
            let since = Instant::now();
            let parent_grads = rule(&self.inner, &g)?;
            record(op, since);
            for (p, pg) in node.parents.iter().zip(parent_grads) {
                let (Some(p), Some(pg)) = (p, pg) else {
                    continue;
                };
                grads[*p] = Some(match grads[*p].take() {
                    Some(acc) => {
                        let since = Instant::now();
                        let sum = self.inner.add(&acc, &pg)?;
                        record("accumulate", since);
                        sum
                    }
                    None => pg,
                });
            }
        }
        out.names.reverse();
        out.profile = times.into_values().collect();
        out.profile
            .sort_by(|a, b| b.time.cmp(&a.time).then(a.op.cmp(b.op)));
        Ok(out)
    }
}

/// A layer's gradients uploaded: the input's, the weight's and the bias's (when it has one).
fn layer_grads<B: Backend>(
    b: &B,
    (dx, xs): (Vec<f32>, &[usize]),
    (dw, ws): (Vec<f32>, &[usize]),
    db: Option<Vec<f32>>,
) -> Result<Vec<Option<B::Tensor>>> {
    let mut out = vec![Some(b.upload_vec(dx, xs)?), Some(b.upload_vec(dw, ws)?)];
    if let Some(db) = db {
        let len = db.len();
        out.push(Some(b.upload_vec(db, &[len])?));
    }
    Ok(out)
}

/// The host values of `t` (borrowed where the backend keeps them on the host).
fn host<'a, B: Backend>(b: &B, t: &'a B::Tensor) -> Result<Cow<'a, [f32]>> {
    b.host_values(t)
}

/// `g` (of shape `from`) summed down to `to` under numpy broadcasting. Walks `g` one
/// innermost row at a time: a row either adds into one value of the result (the last axis
/// broadcast) or into a row of it.
fn reduce_to(g: &[f32], from: &[usize], to: &[usize]) -> Vec<f32> {
    if from == to {
        return g.to_vec();
    }
    let rank = from.len();
    let pad = rank - to.len().min(rank);
    let target: Vec<usize> = (0..rank)
        .map(|i| if i < pad { 1 } else { to[i - pad] })
        .collect();
    // The result's stride per axis of `from` (0 where that axis is summed away).
    let mut strides = vec![0usize; rank];
    let mut step = 1;
    for d in (0..rank).rev() {
        if target[d] != 1 {
            strides[d] = step;
        }
        step *= target[d];
    }
    let mut out = vec![0.0f64; target.iter().product()];
    let last = from.last().copied().unwrap_or(1).max(1);
    let inner = strides.last().copied().unwrap_or(0);
    let mut index = vec![0usize; rank.saturating_sub(1)];
    for row in g.chunks_exact(last) {
        let base: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        if inner == 0 {
            out[base] += row.iter().map(|&v| f64::from(v)).sum::<f64>();
        } else {
            for (o, &v) in out[base..base + last].iter_mut().zip(row) {
                *o += f64::from(v);
            }
        }
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < from[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// Permutes host `[..]` data of `shape` by `axes` (`x` must hold `shape`'s values).
fn permute_host(x: &[f32], shape: &[usize], axes: &[usize]) -> Vec<f32> {
    debug_assert_eq!(x.len(), shape.iter().product::<usize>());
    let rank = shape.len();
    let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let mut strides = vec![1usize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let mut out = Vec::with_capacity(x.len());
    let mut index = vec![0usize; rank];
    for _ in 0..x.len() {
        let src: usize = (0..rank).map(|d| index[d] * strides[axes[d]]).sum();
        out.push(x[src]);
        for d in (0..rank).rev() {
            index[d] += 1;
            if index[d] < out_shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

impl<B: Backend> BackendBase for Autodiff<B> {
    type Tensor = Var<B::Tensor>;

    fn name(&self) -> String {
        format!("autodiff({})", self.inner.name())
    }

    fn shape<'a>(&self, tensor: &'a Self::Tensor) -> &'a [usize] {
        self.inner.shape(&tensor.value)
    }

    fn dtype(&self, tensor: &Self::Tensor) -> DType {
        self.inner.dtype(&tensor.value)
    }
}

impl<B: Backend> DataOps for Autodiff<B> {
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        Ok(self.leaf(self.inner.upload(data, shape)?))
    }

    fn upload_half(&self, data: HalfData<'_>, shape: &[usize]) -> Result<Self::Tensor> {
        // Weights train in f32.
        let values: Vec<f32> = match data {
            HalfData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HalfData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        };
        self.upload(&values, shape)
    }

    fn download(&self, tensor: &Self::Tensor) -> Result<Vec<f32>> {
        self.inner.download(&tensor.value)
    }

    fn upload_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<Self::Tensor> {
        Ok(self.leaf(self.inner.upload_vec(data, shape)?))
    }

    fn host_values<'a>(&self, tensor: &'a Self::Tensor) -> Result<Cow<'a, [f32]>> {
        self.inner.host_values(&tensor.value)
    }

    fn reshape(&self, t: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        let from = self.inner.shape(&t.value).to_vec();
        let value = self.inner.reshape(&t.value, shape)?;
        Ok(self.op(
            "reshape",
            value,
            &[t],
            Box::new(move |b, g| Ok(vec![Some(b.reshape(g, &from)?)])),
        ))
    }

    fn permute(&self, t: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor> {
        let mut inverse = vec![0; axes.len()];
        for (i, &a) in axes.iter().enumerate() {
            if let Some(slot) = inverse.get_mut(a) {
                *slot = i;
            }
        }
        let value = self.inner.permute(&t.value, axes)?;
        Ok(self.op(
            "permute",
            value,
            &[t],
            Box::new(move |b, g| Ok(vec![Some(b.permute(g, &inverse)?)])),
        ))
    }

    fn slice(
        &self,
        t: &Self::Tensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor> {
        let shape = self.inner.shape(&t.value).to_vec();
        let value = self.inner.slice(&t.value, axis, start, len)?;
        let rule: Rule<B> = Box::new(move |b, g| {
            // Zeros around the slice's gradient, back to the input's shape.
            let part = |n: usize| -> Result<Option<B::Tensor>> {
                if n == 0 {
                    return Ok(None);
                }
                let mut s = shape.clone();
                s[axis] = n;
                Ok(Some(b.upload_vec(vec![0.0; s.iter().product()], &s)?))
            };
            let before = part(start)?;
            let after = part(shape[axis] - start - len)?;
            let pieces: Vec<&B::Tensor> =
                before.iter().chain(Some(g)).chain(after.iter()).collect();
            Ok(vec![Some(b.concat(&pieces, axis)?)])
        });
        Ok(self.op("slice", value, &[t], rule))
    }

    fn concat(&self, tensors: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor> {
        let values: Vec<&B::Tensor> = tensors.iter().map(|t| &t.value).collect();
        let sizes: Vec<usize> = values
            .iter()
            .map(|v| self.inner.shape(v).get(axis).copied().unwrap_or(0))
            .collect();
        let value = self.inner.concat(&values, axis)?;
        let rule: Rule<B> = Box::new(move |b, g| {
            let mut start = 0;
            sizes
                .iter()
                .map(|&n| {
                    let part = b.slice(g, axis, start, n)?;
                    start += n;
                    Ok(Some(part))
                })
                .collect()
        });
        Ok(self.op("concat", value, tensors, rule))
    }

    fn cast(&self, t: &Self::Tensor, dtype: DType) -> Result<Self::Tensor> {
        let from = self.inner.dtype(&t.value);
        let value = self.inner.cast(&t.value, dtype)?;
        Ok(self.op(
            "cast",
            value,
            &[t],
            Box::new(move |b, g| Ok(vec![Some(b.cast(g, from)?)])),
        ))
    }
}

impl<B: Backend> Autodiff<B> {
    /// A binary elementwise operation's node: `da(g, a, b)` and `db(g, a, b)` give the
    /// gradients at the broadcast shape, summed back to each input's shape.
    fn binary(
        &self,
        name: &'static str,
        a: &Var<B::Tensor>,
        b: &Var<B::Tensor>,
        value: B::Tensor,
        rule: fn(f32, f32, f32) -> (f32, f32),
    ) -> Var<B::Tensor> {
        let (sa, sb) = (
            self.inner.shape(&a.value).to_vec(),
            self.inner.shape(&b.value).to_vec(),
        );
        let out_shape = self.inner.shape(&value).to_vec();
        let (va, vb) = (a.value.clone(), b.value.clone());
        let r: Rule<B> = Box::new(move |be, g| {
            let gh = host(be, g)?;
            // The inputs broadcast to the output's shape (zeros plus the input).
            let zeros = be.upload_vec(vec![0.0; out_shape.iter().product()], &out_shape)?;
            let (wa, wb) = (be.add(&zeros, &va)?, be.add(&zeros, &vb)?);
            let (xa, xb) = (host(be, &wa)?, host(be, &wb)?);
            let (mut ga, mut gb) = (Vec::with_capacity(gh.len()), Vec::with_capacity(gh.len()));
            for ((&g, &x), &y) in gh.iter().zip(xa.iter()).zip(xb.iter()) {
                let (da, db) = rule(g, x, y);
                ga.push(da);
                gb.push(db);
            }
            Ok(vec![
                Some(be.upload_vec(reduce_to(&ga, &out_shape, &sa), &sa)?),
                Some(be.upload_vec(reduce_to(&gb, &out_shape, &sb), &sb)?),
            ])
        });
        self.op(name, value, &[a, b], r)
    }
}

impl<B: Backend> ElementwiseOps for Autodiff<B> {
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.add(&a.value, &b.value)?;
        let (sa, sb) = (
            self.inner.shape(&a.value).to_vec(),
            self.inner.shape(&b.value).to_vec(),
        );
        let out_shape = self.inner.shape(&value).to_vec();
        let rule: Rule<B> = Box::new(move |be, g| {
            let part = |s: &[usize]| -> Result<Option<B::Tensor>> {
                if s == out_shape.as_slice() {
                    return Ok(Some(g.clone()));
                }
                let gh = host(be, g)?;
                Ok(Some(be.upload_vec(reduce_to(&gh, &out_shape, s), s)?))
            };
            Ok(vec![part(&sa)?, part(&sb)?])
        });
        Ok(self.op("add", value, &[a, b], rule))
    }

    fn sub(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.sub(&a.value, &b.value)?;
        Ok(self.binary("sub", a, b, value, |g, _, _| (g, -g)))
    }

    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.mul(&a.value, &b.value)?;
        Ok(self.binary("mul", a, b, value, |g, x, y| (g * y, g * x)))
    }

    fn affine(&self, x: &Self::Tensor, scale: f32, shift: f32) -> Result<Self::Tensor> {
        let value = self.inner.affine(&x.value, scale, shift)?;
        Ok(self.op(
            "affine",
            value,
            &[x],
            Box::new(move |b, g| Ok(vec![Some(b.affine(g, scale, 0.0)?)])),
        ))
    }
}

impl<B: Backend> MatmulOps for Autodiff<B> {
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.matmul(&a.value, &b.value)?;
        Ok(self.op(
            "matmul",
            value,
            &[a, b],
            Box::new(|_, _| Err(no_rule("matmul"))),
        ))
    }

    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let value = self
            .inner
            .linear(&x.value, &weight.value, bias.map(|b| &b.value))?;
        let (xv, wv) = (x.value.clone(), weight.value.clone());
        let (xs, ws) = (
            self.inner.shape(&x.value).to_vec(),
            self.inner.shape(&weight.value).to_vec(),
        );
        let with_bias = bias.is_some();
        let rule: Rule<B> = Box::new(move |b, g| {
            let (n, k) = (ws[0], ws[1]);
            let xh = host(b, &xv)?;
            let m = xh.len() / k.max(1);
            let (dx, dw, db) = grad::linear_backward(&xh, &host(b, &wv)?, &host(b, g)?, (m, k, n))?;
            layer_grads(b, (dx, &xs), (dw, &ws), with_bias.then_some(db))
        });
        Ok(self.layer_op("linear", value, x, weight, bias, rule))
    }
}

impl<B: Backend> ResampleOps for Autodiff<B> {
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.upsample_nearest2x(&x.value)?;
        let xs = self.inner.shape(&x.value).to_vec();
        let rule: Rule<B> = Box::new(move |b, g| {
            let &[n, c, h, w] = xs.as_slice() else {
                return Err(no_rule("upsample_nearest2x of a non-4-D tensor"));
            };
            let dx = grad::upsample_nearest2x_backward(&host(b, g)?, (n, c, h, w))?;
            Ok(vec![Some(b.upload_vec(dx, &xs)?)])
        });
        Ok(self.op("upsample_nearest2x", value, &[x], rule))
    }
}

impl<B: Backend> ConvOps for Autodiff<B> {
    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor> {
        let value = self
            .inner
            .conv2d(&x.value, &weight.value, bias.map(|b| &b.value), params)?;
        let (xv, wv) = (x.value.clone(), weight.value.clone());
        let (xs, ws) = (
            self.inner.shape(&x.value).to_vec(),
            self.inner.shape(&weight.value).to_vec(),
        );
        let with_bias = bias.is_some();
        let rule: Rule<B> = Box::new(move |b, g| {
            let (&[n, c_in, h, w], &[c_out, _, k, _]) = (xs.as_slice(), ws.as_slice()) else {
                return Err(no_rule("conv2d of a non-4-D tensor"));
            };
            if params.stride.0 != params.stride.1 || params.padding.0 != params.padding.1 {
                return Err(no_rule("conv2d with unequal strides or paddings"));
            }
            let shape = ConvShape {
                n,
                c_in,
                h,
                w,
                c_out,
                k,
                stride: params.stride.0,
                padding: params.padding.0,
            };
            let (dx, dw, db) =
                grad::conv2d_backward(shape, &host(b, &xv)?, &host(b, &wv)?, &host(b, g)?)?;
            layer_grads(b, (dx, &xs), (dw, &ws), with_bias.then_some(db))
        });
        Ok(self.layer_op("conv2d", value, x, weight, bias, rule))
    }
}

impl<B: Backend> ActivationOps for Autodiff<B> {
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.silu(&x.value)?;
        let xv = x.value.clone();
        let xs = self.inner.shape(&x.value).to_vec();
        let rule: Rule<B> = Box::new(move |b, g| {
            let dx = grad::silu_backward(&host(b, &xv)?, &host(b, g)?)?;
            Ok(vec![Some(b.upload_vec(dx, &xs)?)])
        });
        Ok(self.op("silu", value, &[x], rule))
    }

    fn gelu(&self, x: &Self::Tensor, approximation: GeluApproximation) -> Result<Self::Tensor> {
        let value = self.inner.gelu(&x.value, approximation)?;
        Ok(self.op("gelu", value, &[x], Box::new(|_, _| Err(no_rule("gelu")))))
    }

    fn quick_gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.quick_gelu(&x.value)?;
        Ok(self.op(
            "quick_gelu",
            value,
            &[x],
            Box::new(|_, _| Err(no_rule("quick_gelu"))),
        ))
    }

    fn softmax_last(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let value = self.inner.softmax_last(&x.value)?;
        let yv = value.clone();
        let shape = self.inner.shape(&value).to_vec();
        let rule: Rule<B> = Box::new(move |b, g| {
            let (y, gh) = (host(b, &yv)?, host(b, g)?);
            let last = shape.last().copied().unwrap_or(1).max(1);
            let mut dx = vec![0.0f32; y.len()];
            for ((yr, gr), dr) in y.chunks(last).zip(gh.chunks(last)).zip(dx.chunks_mut(last)) {
                let dot: f64 = yr
                    .iter()
                    .zip(gr)
                    .map(|(&a, &c)| f64::from(a) * f64::from(c))
                    .sum();
                for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                    *d = (f64::from(yv) * (f64::from(gv) - dot)) as f32;
                }
            }
            Ok(vec![Some(b.upload_vec(dx, &shape)?)])
        });
        Ok(self.op("softmax_last", value, &[x], rule))
    }
}

impl<B: Backend> Autodiff<B> {
    fn norm(
        &self,
        x: &Var<B::Tensor>,
        groups: usize,
        gamma: &Var<B::Tensor>,
        beta: &Var<B::Tensor>,
        eps: f32,
        silu: bool,
    ) -> Result<Var<B::Tensor>> {
        let value = if silu {
            self.inner
                .group_norm_silu(&x.value, groups, &gamma.value, &beta.value, eps)?
        } else {
            self.inner
                .group_norm(&x.value, groups, &gamma.value, &beta.value, eps)?
        };
        let (xv, gv, bv) = (x.value.clone(), gamma.value.clone(), beta.value.clone());
        let xs = self.inner.shape(&x.value).to_vec();
        let rule: Rule<B> = Box::new(move |b, g| {
            let (n, c) = (
                xs.first().copied().unwrap_or(1),
                xs.get(1).copied().unwrap_or(1),
            );
            let hw = xs.iter().skip(2).product::<usize>();
            let shape = GroupNormShape {
                n,
                c,
                hw,
                groups,
                eps: f64::from(eps),
            };
            let (dx, dg, db) = grad::group_norm_backward(
                shape,
                &host(b, &xv)?,
                &host(b, &gv)?,
                &host(b, &bv)?,
                &host(b, g)?,
                silu,
            )?;
            Ok(vec![
                Some(b.upload_vec(dx, &xs)?),
                Some(b.upload_vec(dg, &[c])?),
                Some(b.upload_vec(db, &[c])?),
            ])
        });
        Ok(self.op(
            if silu {
                "group_norm_silu"
            } else {
                "group_norm"
            },
            value,
            &[x, gamma, beta],
            rule,
        ))
    }
}

impl<B: Backend> NormOps for Autodiff<B> {
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.norm(x, groups, gamma, beta, eps, false)
    }

    fn group_norm_silu(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.norm(x, groups, gamma, beta, eps, true)
    }

    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let value = self
            .inner
            .layer_norm(&x.value, &gamma.value, &beta.value, eps)?;
        Ok(self.op(
            "layer_norm",
            value,
            &[x, gamma, beta],
            Box::new(|_, _| Err(no_rule("layer_norm"))),
        ))
    }
}

impl<B: Backend> AttentionOps for Autodiff<B> {
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: AttentionMask<'_, Self::Tensor>,
        scale: f32,
    ) -> Result<Self::Tensor> {
        let inner_mask = match mask {
            AttentionMask::None => AttentionMask::None,
            AttentionMask::Causal => AttentionMask::Causal,
            AttentionMask::Additive(m) => AttentionMask::Additive(&m.value),
        };
        let masked = !matches!(mask, AttentionMask::None);
        let value = self
            .inner
            .attention(&q.value, &k.value, &v.value, inner_mask, scale)?;
        let (qv, kv, vv) = (q.value.clone(), k.value.clone(), v.value.clone());
        let (qs, ks, vs) = (
            self.inner.shape(&q.value).to_vec(),
            self.inner.shape(&k.value).to_vec(),
            self.inner.shape(&v.value).to_vec(),
        );
        let rule: Rule<B> = Box::new(move |b, g| {
            if masked {
                return Err(no_rule("masked attention"));
            }
            if vs != ks {
                return Err(no_rule(
                    "attention with values of another width than the keys",
                ));
            }
            let (&[batch, heads, len_q, head_dim], &[_, _, len_k, _]) =
                (qs.as_slice(), ks.as_slice())
            else {
                return Err(no_rule("attention of non-4-D tensors"));
            };
            // [B, H, L, D] <-> [B, L, H * D], the primitive's layout.
            let to_tokens = |t: &[f32], len: usize| {
                permute_host(t, &[batch, heads, len, head_dim], &[0, 2, 1, 3])
            };
            let to_heads = |t: &[f32], len: usize| {
                permute_host(t, &[batch, len, heads, head_dim], &[0, 2, 1, 3])
            };
            let shape = AttentionShape {
                batch,
                len_q,
                len_k,
                heads,
                head_dim,
                scale,
            };
            let (dq, dk, dv) = grad::attention_backward(
                shape,
                &to_tokens(&host(b, &qv)?, len_q),
                &to_tokens(&host(b, &kv)?, len_k),
                &to_tokens(&host(b, &vv)?, len_k),
                &to_tokens(&host(b, g)?, len_q),
            )?;
            Ok(vec![
                Some(b.upload_vec(to_heads(&dq, len_q), &qs)?),
                Some(b.upload_vec(to_heads(&dk, len_k), &ks)?),
                Some(b.upload_vec(to_heads(&dv, len_k), &ks)?),
            ])
        });
        Ok(self.op("attention", value, &[q, k, v], rule))
    }
}

impl<B: Backend> Autodiff<B> {
    /// `inner`'s weights, each named on this tape by its full key as the network loads it,
    /// so that [`Gradients::named`] reports the gradients by the keys a diffusers checkpoint
    /// uses.
    pub fn named_source<S: WeightSource>(&self, inner: S) -> WatchedSource<S> {
        let tape = self.tape.clone();
        WatchedSource::new(inner, move |key, _| {
            tape.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pending_name = Some(key.to_owned());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::reduce_to;

    /// Sums down to every broadcast shape of a 4-D gradient (and of lower ranks), against
    /// the definition: each value adds into the result's value at its index with the
    /// broadcast axes set to 0.
    #[test]
    fn broadcast_gradients_sum_to_their_inputs_shapes() {
        let from = [2usize, 3, 4, 5];
        let g: Vec<f32> = (0..120).map(|i| (i as f32 * 0.37).sin()).collect();
        let cases: [&[usize]; 8] = [
            &[2, 3, 4, 5],
            &[2, 3, 1, 1],
            &[1, 3, 1, 1],
            &[3, 1, 1],
            &[5],
            &[1, 1, 4, 1],
            &[2, 1, 4, 5],
            &[1],
        ];
        for to in cases {
            let got = reduce_to(&g, &from, to);
            let pad = 4 - to.len();
            let target: Vec<usize> = (0..4)
                .map(|i| if i < pad { 1 } else { to[i - pad] })
                .collect();
            let mut want = vec![0.0f64; target.iter().product()];
            for (i, &v) in g.iter().enumerate() {
                let idx = [i / 60, i / 20 % 3, i / 5 % 4, i % 5];
                let flat = (0..4).fold(0, |acc, d| {
                    acc * target[d] + if target[d] == 1 { 0 } else { idx[d] }
                });
                want[flat] += f64::from(v);
            }
            assert_eq!(got.len(), want.len(), "{to:?}");
            for (a, b) in got.iter().zip(&want) {
                assert!((f64::from(*a) - b).abs() < 1e-5, "{to:?}: {a} against {b}");
            }
        }
    }
}
