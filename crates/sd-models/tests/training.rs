//! The backward primitives and the optimiser of `sd_models::train` against PyTorch's
//! autograd and `torch.optim.AdamW` (`fixtures/training`, written by
//! `tools/fixtures/generate.py training`): each layer's input and parameter gradients for a
//! given upstream gradient, and three AdamW steps with and without weight decay and clipping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use common::fixtures::{read_json, read_tensors, root};
use sd_models::train::grad::{self, AttentionShape, ConvShape, GroupNormShape};
use sd_models::train::optim::{self, AdamW, AdamWState};

type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn layers() -> (serde_json::Value, Tensors) {
    let dir = root().join("training");
    (
        read_json(&dir.join("layers.json")),
        read_tensors(&dir.join("layers.safetensors")),
    )
}

/// The largest difference relative to the largest reference value.
fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
    let diff = got.iter().zip(want).fold(0.0f64, |m, (&a, &b)| {
        m.max((f64::from(a) - f64::from(b)).abs())
    });
    if scale == 0.0 { diff } else { diff / scale }
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel(got, want);
    println!("{what}: {e:.2e}");
    assert!(e < 5e-6, "{what}: {e:e}");
}

fn case<'a>(meta: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn arg(c: &serde_json::Value, key: &str) -> serde_json::Value {
    c["args"][key].clone()
}

#[test]
fn convolutions_match_autograd() {
    let (meta, t) = layers();
    for (name, prefix) in [
        ("conv3x3", ""),
        ("conv3x3_stride2", "conv."),
        ("conv3x3_stride2_odd", "conv."),
        ("conv1x1", ""),
        ("conv3x3_8to16", ""),
    ] {
        let c = case(&meta, name);
        let x = &t[&format!("{name}.input.x")];
        let w = &t[&format!("{name}.param.{prefix}weight")];
        let dy = &t[&format!("{name}.grad_out")];
        let k = w.0[2];
        let stride = if name.contains("stride2") { 2 } else { 1 };
        let padding = if k == 3 { 1 } else { 0 };
        let _ = c;
        let shape = ConvShape {
            n: x.0[0],
            c_in: x.0[1],
            h: x.0[2],
            w: x.0[3],
            c_out: w.0[0],
            k,
            stride,
            padding,
        };
        assert_eq!(shape.out_hw(), (dy.0[2], dy.0[3]), "{name}");
        let grads = grad::conv2d_backward(shape, &x.1, &w.1, &dy.1).unwrap();
        check_layer(&t, name, prefix, &grads);
    }
}

/// A layer's `(dx, dweight, dbias)` against the case's.
fn check_layer(
    t: &Tensors,
    name: &str,
    prefix: &str,
    (dx, dw, db): &(Vec<f32>, Vec<f32>, Vec<f32>),
) {
    close(
        &format!("{name} dx"),
        dx,
        &t[&format!("{name}.grad.input.x")].1,
    );
    for (part, got) in [("weight", dw), ("bias", db)] {
        let want = &t[&format!("{name}.grad.param.{prefix}{part}")].1;
        close(&format!("{name} d{part}"), got, want);
    }
}

#[test]
fn group_norms_silu_and_linear_layers_match_autograd() {
    let (meta, t) = layers();
    for (name, prefix, eps, silu) in [
        ("group_norm", "", 1e-5, false),
        ("group_norm_eps1e-6", "", 1e-6, false),
        ("group_norm_silu", "norm.", 1e-5, true),
    ] {
        let _ = case(&meta, name);
        let x = &t[&format!("{name}.input.x")];
        let shape = GroupNormShape {
            n: x.0[0],
            c: x.0[1],
            hw: x.0[2] * x.0[3],
            groups: 4,
            eps,
        };
        let grads = grad::group_norm_backward(
            shape,
            &x.1,
            &t[&format!("{name}.param.{prefix}weight")].1,
            &t[&format!("{name}.param.{prefix}bias")].1,
            &t[&format!("{name}.grad_out")].1,
            silu,
        )
        .unwrap();
        check_layer(&t, name, prefix, &grads);
    }
    let dx = grad::silu_backward(&t["silu.input.x"].1, &t["silu.grad_out"].1).unwrap();
    close("silu dx", &dx, &t["silu.grad.input.x"].1);
    for name in ["linear_2d", "linear_3d"] {
        let x = &t[&format!("{name}.input.x")];
        let w = &t[&format!("{name}.param.weight")];
        let (n, k) = (w.0[0], w.0[1]);
        let m = x.1.len() / k;
        let grads = grad::linear_backward(&x.1, &w.1, &t[&format!("{name}.grad_out")].1, (m, k, n))
            .unwrap();
        check_layer(&t, name, "", &grads);
    }
}

#[test]
fn upsampling_embeddings_sums_and_the_loss_match_autograd() {
    let (_, t) = layers();
    // Upsample2D: nearest 2x, then a 3x3 convolution.
    let x = &t["upsample_conv.input.x"];
    let w = &t["upsample_conv.param.conv.weight"];
    let (n, c, h, wd) = (x.0[0], x.0[1], x.0[2], x.0[3]);
    let shape = ConvShape {
        n,
        c_in: c,
        h: 2 * h,
        w: 2 * wd,
        c_out: w.0[0],
        k: 3,
        stride: 1,
        padding: 1,
    };
    let mut up = vec![0.0f32; n * c * 4 * h * wd];
    for p in 0..n * c {
        for y in 0..2 * h {
            for xx in 0..2 * wd {
                up[(p * 2 * h + y) * 2 * wd + xx] = x.1[(p * h + y / 2) * wd + xx / 2];
            }
        }
    }
    let (dup, dw, db) =
        grad::conv2d_backward(shape, &up, &w.1, &t["upsample_conv.grad_out"].1).unwrap();
    let dx = grad::upsample_nearest2x_backward(&dup, (n, c, h, wd)).unwrap();
    close("upsample dx", &dx, &t["upsample_conv.grad.input.x"].1);
    close(
        "upsample dweight",
        &dw,
        &t["upsample_conv.grad.param.conv.weight"].1,
    );
    close(
        "upsample dbias",
        &db,
        &t["upsample_conv.grad.param.conv.bias"].1,
    );
    // The class embedding: rows summed by label.
    let labels: Vec<usize> = t["class_embedding.input.labels"]
        .1
        .iter()
        .map(|&v| v as usize)
        .collect();
    let table = &t["class_embedding.param.weight"];
    let dw = grad::embedding_backward(
        &labels,
        &t["class_embedding.grad_out"].1,
        table.0[0],
        table.0[1],
    )
    .unwrap();
    close(
        "class embedding",
        &dw,
        &t["class_embedding.grad.param.weight"].1,
    );
    assert!(
        grad::embedding_backward(&[99], &vec![0.0; table.0[1]], table.0[0], table.0[1]).is_err()
    );
    // A per-channel value broadcast over the image.
    let xs = &t["add_broadcast.input.x"];
    let dt = grad::sum_spatial(
        &t["add_broadcast.grad_out"].1,
        (xs.0[0], xs.0[1], xs.0[2] * xs.0[3]),
    )
    .unwrap();
    close("broadcast add", &dt, &t["add_broadcast.grad.input.t"].1);
    // The mean squared error.
    let (loss, dpred) =
        grad::mse_loss(&t["mse_loss.input.pred"].1, &t["mse_loss.input.target"].1).unwrap();
    close("mse", &[loss], &t["mse_loss.output"].1);
    let g = t["mse_loss.grad_out"].1[0];
    let dpred: Vec<f32> = dpred.iter().map(|v| v * g).collect();
    close("mse dpred", &dpred, &t["mse_loss.grad.input.pred"].1);
}

/// Group norm `[n, c, hw]` forward, for the composite cases.
fn group_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    (n, c, hw, groups): (usize, usize, usize, usize),
    eps: f64,
) -> Vec<f32> {
    let cg = c / groups;
    let mut out = vec![0.0; x.len()];
    for b in 0..n {
        for g in 0..groups {
            let start = (b * c + g * cg) * hw;
            let xs = &x[start..][..cg * hw];
            let m = xs.len() as f64;
            let mean = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / m;
            let var = xs
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / m;
            let rstd = 1.0 / (var + eps).sqrt();
            for (j, &v) in xs.iter().enumerate() {
                let ch = g * cg + j / hw;
                out[start + j] = ((f64::from(v) - mean) * rstd * f64::from(gamma[ch])
                    + f64::from(beta[ch])) as f32;
            }
        }
    }
    out
}

/// `x [m, k] W^T + b`.
fn linear(x: &[f32], w: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l]))
                .sum();
            out[i * n + j] = (dot + f64::from(b[j])) as f32;
        }
    }
    out
}

/// diffusers' spatial attention block, composed from the primitives: group norm, the q / k
/// / v projections, attention, the output projection and the residual.
#[test]
fn the_attention_block_matches_autograd() {
    let (meta, t) = layers();
    let c_meta = case(&meta, "attention");
    let x = &t["attention.input.x"];
    let (n, c, hw) = (x.0[0], x.0[1], x.0[2] * x.0[3]);
    let p = |name: &str| &t[&format!("attention.param.{name}")].1;
    let heads = arg(c_meta, "heads").as_u64().unwrap() as usize;
    let eps = arg(c_meta, "eps").as_f64().unwrap();
    let groups = arg(c_meta, "norm_num_groups").as_u64().unwrap() as usize;
    let head_dim = c / heads;
    // Forward, keeping what the backward needs.
    let normed = group_norm(
        &x.1,
        p("group_norm.weight"),
        p("group_norm.bias"),
        (n, c, hw, groups),
        eps,
    );
    // [n, c, hw] -> tokens [n, hw, c]
    let mut tokens = vec![0.0f32; normed.len()];
    for b in 0..n {
        for ch in 0..c {
            for s in 0..hw {
                tokens[(b * hw + s) * c + ch] = normed[(b * c + ch) * hw + s];
            }
        }
    }
    let m = n * hw;
    let q = linear(&tokens, p("to_q.weight"), p("to_q.bias"), m, c, c);
    let k = linear(&tokens, p("to_k.weight"), p("to_k.bias"), m, c, c);
    let v = linear(&tokens, p("to_v.weight"), p("to_v.bias"), m, c, c);
    let shape = AttentionShape {
        batch: n,
        len_q: hw,
        len_k: hw,
        heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    // Attention forward (for the output projection's input).
    let mut a = vec![0.0f32; m * c];
    for b in 0..n {
        for h in 0..heads {
            for i in 0..hw {
                let qi = &q[(b * hw + i) * c + h * head_dim..][..head_dim];
                let logits: Vec<f64> = (0..hw)
                    .map(|j| {
                        let kj = &k[(b * hw + j) * c + h * head_dim..][..head_dim];
                        qi.iter()
                            .zip(kj)
                            .map(|(&x, &y)| f64::from(x) * f64::from(y))
                            .sum::<f64>()
                            * f64::from(shape.scale)
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..head_dim {
                    let o: f64 = (0..hw)
                        .map(|j| e[j] / sum * f64::from(v[(b * hw + j) * c + h * head_dim + d]))
                        .sum();
                    a[(b * hw + i) * c + h * head_dim + d] = o as f32;
                }
            }
        }
    }
    // Backward: out = x + to_out(a) (rescale 1).
    let dout_img = &t["attention.grad_out"].1;
    let mut dtok = vec![0.0f32; m * c];
    for b in 0..n {
        for ch in 0..c {
            for s in 0..hw {
                dtok[(b * hw + s) * c + ch] = dout_img[(b * c + ch) * hw + s];
            }
        }
    }
    let (da, dwo, dbo) = grad::linear_backward(&a, p("to_out.0.weight"), &dtok, (m, c, c)).unwrap();
    let (dq, dk, dv) = grad::attention_backward(shape, &q, &k, &v, &da).unwrap();
    let mut dtokens = vec![0.0f32; m * c];
    let mut param_grads = vec![("to_out.0.weight", dwo), ("to_out.0.bias", dbo)];
    for (name, d) in [("to_q", dq), ("to_k", dk), ("to_v", dv)] {
        let (dx, dw, db) =
            grad::linear_backward(&tokens, p(&format!("{name}.weight")), &d, (m, c, c)).unwrap();
        for (acc, v) in dtokens.iter_mut().zip(dx) {
            *acc += v;
        }
        param_grads.push((
            if name == "to_q" {
                "to_q.weight"
            } else if name == "to_k" {
                "to_k.weight"
            } else {
                "to_v.weight"
            },
            dw,
        ));
        param_grads.push((
            if name == "to_q" {
                "to_q.bias"
            } else if name == "to_k" {
                "to_k.bias"
            } else {
                "to_v.bias"
            },
            db,
        ));
    }
    let mut dnormed = vec![0.0f32; normed.len()];
    for b in 0..n {
        for ch in 0..c {
            for s in 0..hw {
                dnormed[(b * c + ch) * hw + s] = dtokens[(b * hw + s) * c + ch];
            }
        }
    }
    let (dx_norm, dgamma, dbeta) = grad::group_norm_backward(
        GroupNormShape {
            n,
            c,
            hw,
            groups,
            eps,
        },
        &x.1,
        p("group_norm.weight"),
        p("group_norm.bias"),
        &dnormed,
        false,
    )
    .unwrap();
    let dx: Vec<f32> = dx_norm.iter().zip(dout_img).map(|(a, b)| a + b).collect();
    close("attention dx", &dx, &t["attention.grad.input.x"].1);
    close(
        "attention group_norm.weight",
        &dgamma,
        &t["attention.grad.param.group_norm.weight"].1,
    );
    close(
        "attention group_norm.bias",
        &dbeta,
        &t["attention.grad.param.group_norm.bias"].1,
    );
    for (name, g) in &param_grads {
        let want = &t[&format!("attention.grad.param.{name}")].1;
        if *name == "to_k.bias" {
            // Zero in exact arithmetic (a bias shared by every key shifts all logits alike).
            assert!(g.iter().all(|v| v.abs() < 1e-5), "to_k.bias {g:?}");
            continue;
        }
        close(&format!("attention {name}"), g, want);
    }
}

#[test]
fn adamw_clipping_schedule_and_ema_match_pytorch() {
    let dir = root().join("training");
    let meta = read_json(&dir.join("adamw.json"));
    let t = read_tensors(&dir.join("adamw.safetensors"));
    let a = &meta["adamw"];
    let names = ["w1", "w2", "w4"];
    for (variant, v) in a["variants"].as_object().unwrap() {
        let opt = AdamW {
            lr: a["lr"].as_f64().unwrap(),
            betas: (0.9, 0.999),
            eps: a["eps"].as_f64().unwrap(),
            weight_decay: v["weight_decay"].as_f64().unwrap(),
        };
        let clip = v["clip_grad_norm"].as_f64();
        let mut params: Vec<Vec<f32>> = names
            .iter()
            .map(|n| t[&format!("init.{n}")].1.clone())
            .collect();
        let mut states = vec![AdamWState::default(); names.len()];
        for step in 1..=3 {
            let mut grads: Vec<Vec<f32>> = names
                .iter()
                .map(|n| t[&format!("step{step}.grad.{n}")].1.clone())
                .collect();
            if let Some(max) = clip {
                let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
                optim::clip_grad_norm(&mut refs, max);
            }
            for ((p, g), s) in params.iter_mut().zip(&grads).zip(states.iter_mut()) {
                opt.step(opt.lr, p, g, s).unwrap();
            }
            for (i, n) in names.iter().enumerate() {
                let key = |what: &str| format!("{variant}.step{step}.{what}.{n}");
                close(&key("param"), &params[i], &t[&key("param")].1);
                close(&key("exp_avg"), &states[i].exp_avg, &t[&key("exp_avg")].1);
                close(
                    &key("exp_avg_sq"),
                    &states[i].exp_avg_sq,
                    &t[&key("exp_avg_sq")].1,
                );
            }
        }
    }
    // The learning-rate schedule and the EMA of tools/digits/train.py.
    let lr = &meta["lr_schedule"];
    let (total, warmup, base) = (
        lr["total_steps"].as_u64().unwrap() as usize,
        lr["warmup_steps"].as_u64().unwrap() as usize,
        lr["base_lr"].as_f64().unwrap(),
    );
    for (s, want) in lr["step_indices"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lr["train_py"].as_array().unwrap())
    {
        let got = optim::warmup_cosine_lr(s.as_u64().unwrap() as usize, warmup, total, base);
        let want = want.as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-12 + 1e-9 * want.abs(),
            "lr at {s}: {got} {want}"
        );
    }
    let ema = &meta["ema"];
    for (k, want) in ema["steps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(ema["train_py_decay"].as_array().unwrap())
    {
        // train.py's k-th update counts from 1; step 0 in the table is its value for k = 0.
        let got = optim::ema_decay(k.as_u64().unwrap(), ema["decay"].as_f64().unwrap());
        assert!(
            (got - want.as_f64().unwrap()).abs() < 1e-12,
            "ema decay at {k}"
        );
    }
    let mut shadow = t["ema.shadow0"].1.clone();
    for k in 1..=3u64 {
        optim::ema_update(
            &mut shadow,
            &t[&format!("ema.param{k}")].1,
            optim::ema_decay(k, 0.999),
        );
        close(
            &format!("ema after {k}"),
            &shadow,
            &t[&format!("ema.train_py.after{k}")].1,
        );
    }
}

/// The whole digits UNet2DModel, run unchanged on the autodiff backend: one training batch's
/// loss and the gradient of every parameter and of the input, against PyTorch's autograd
/// (`unet2d.safetensors`; weights in `unet2d_init`).
#[test]
fn the_digits_unet_gradient_matches_autograd() {
    use sd_models::CpuBackend;
    use sd_models::backend::DataOps;
    use sd_models::nn::ClassLabels;
    use sd_models::train::autodiff::Autodiff;
    use sd_models::unet::{Unet2DConfig, Unet2DModel};
    use sd_models::weights::{OpenOptions, Variant};

    let dir = root().join("training");
    let t = read_tensors(&dir.join("unet2d.safetensors"));
    let ad = Autodiff::new(CpuBackend::new());
    let init = dir.join("unet2d_init");
    let config = Unet2DConfig::from_file(init.join("config.json")).unwrap();
    let unet = OpenOptions::new()
        .strict(true)
        .load_folder(&init, &[Variant::Default], |store| {
            Unet2DModel::from_source(&ad, &ad.named_source(store.root()), config)
        })
        .unwrap();
    let x_t = &t["x_t"];
    let x = ad.upload(&x_t.1, &x_t.0).unwrap();
    let timesteps: Vec<f64> = t["timesteps"].1.iter().map(|&v| f64::from(v)).collect();
    let labels: Vec<u32> = t["class_labels"].1.iter().map(|&v| v as u32).collect();
    let out = unet
        .forward(&ad, &x, &timesteps, Some(ClassLabels::Ids(&labels)))
        .unwrap();
    let pred = ad.download(&out).unwrap();
    close("model output", &pred, &t["model_output"].1);
    let (loss, dpred) = grad::mse_loss(&pred, &t["noise"].1).unwrap();
    close("loss", &[loss], &t["loss"].1);
    let seed = ad.inner().upload(&dpred, &x_t.0).unwrap();
    let grads = ad.backward(&out, &seed).unwrap();
    let cpu = ad.inner();
    let dx = cpu.download(grads.of(&x).unwrap()).unwrap();
    close("d loss / d x_t", &dx, &t["grad.x_t"].1);
    let mut seen = 0;
    let mut worst = (0.0f64, String::new());
    for (name, g) in grads.named() {
        let want = &t[&format!("grad.param.{name}")].1;
        let got = cpu.download(g).unwrap();
        if name.ends_with("to_k.bias") {
            // Zero in exact arithmetic.
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(got.iter().all(|v| v.abs() < 1e-6), "{name}: {scale}");
        } else {
            let e = rel(&got, want);
            if e > worst.0 {
                worst = (e, name.to_owned());
            }
            assert!(e < 5e-5, "{name}: {e:e}");
        }
        seen += 1;
    }
    println!("worst parameter gradient: {} at {:.2e}", worst.1, worst.0);
    let expected = t.keys().filter(|k| k.starts_with("grad.param.")).count();
    assert_eq!(seen, expected, "every parameter has a gradient");
}

/// A trainer of the digits network from the fixture's initial weights, and the fixture's
/// batch of 4: `(trainer, tensors, timesteps, labels)`.
fn digits_trainer() -> (
    sd_models::train::ddpm::DdpmTrainer,
    Tensors,
    Vec<usize>,
    Vec<u32>,
) {
    use sd_models::train::ddpm::{DdpmTrainer, Parameters, TrainOptions};
    use sd_models::unet::Unet2DConfig;
    use sd_models::weights::{OpenOptions, Variant};
    use sd_schedulers::SchedulerConfig;

    let dir = root().join("training");
    let t = read_tensors(&dir.join("unet2d.safetensors"));
    let init = dir.join("unet2d_init");
    let config = Unet2DConfig::from_file(init.join("config.json")).unwrap();
    let params = OpenOptions::new()
        .load_folder(&init, &[Variant::Default], |store| {
            Parameters::capture(&store.root(), &config)
        })
        .unwrap();
    assert_eq!(params.count(), 1_114_081);
    let scheduler_json =
        std::fs::read_to_string(root().join("../assets/digits/scheduler/scheduler_config.json"))
            .unwrap();
    let scheduler = SchedulerConfig::from_json(&scheduler_json).unwrap();
    let trainer = DdpmTrainer::new(config, params, &scheduler, TrainOptions::default()).unwrap();
    let timesteps: Vec<usize> = t["timesteps"].1.iter().map(|&v| v as usize).collect();
    let labels: Vec<u32> = t["class_labels"].1.iter().map(|&v| v as u32).collect();
    (trainer, t, timesteps, labels)
}

/// The trainer on one batch: its first loss is PyTorch's for the same batch, and AdamW steps
/// on that batch bring the loss down; a checkpoint written by it loads as a diffusers
/// `UNet2DModel` folder that predicts what the trainer's parameters predict.
#[test]
fn the_trainer_fits_a_batch_and_writes_a_loadable_checkpoint() {
    use sd_models::CpuBackend;
    use sd_models::backend::DataOps;
    use sd_models::nn::ClassLabels;
    use sd_models::train::ddpm::Batch;
    use sd_models::unet::{Unet2DConfig, Unet2DModel};
    use sd_models::weights::Variant;

    let (mut trainer, t, timesteps, labels) = digits_trainer();
    let init = root().join("training/unet2d_init");
    let config = Unet2DConfig::from_file(init.join("config.json")).unwrap();
    let batch = Batch {
        x0: &t["x0"].1,
        noise: &t["noise"].1,
        timesteps: &timesteps,
        labels: &labels,
        shape: [4, 1, 16, 16],
    };
    // Bad batches are typed errors that change no parameter: parts of other lengths, a
    // timestep past the schedule, a wrong channel count, a non-finite sample.
    let before = trainer.params.clone();
    let short = Batch {
        noise: &t["noise"].1[..100],
        ..batch
    };
    assert!(matches!(
        trainer.step(short, 1e-3),
        Err(sd_models::Error::Shape { .. })
    ));
    let late = [0, 1, 2, 1000];
    assert!(
        trainer
            .step(
                Batch {
                    timesteps: &late,
                    ..batch
                },
                1e-3
            )
            .is_err()
    );
    let two_channels = Batch {
        shape: [2, 2, 16, 16],
        timesteps: &timesteps[..2],
        labels: &labels[..2],
        ..batch
    };
    assert!(trainer.step(two_channels, 1e-3).is_err());
    let mut nan = t["x0"].1.clone();
    nan[7] = f32::NAN;
    let e = trainer.step(Batch { x0: &nan, ..batch }, 1e-3).unwrap_err();
    assert!(matches!(e, sd_models::Error::NonFinite { .. }), "{e}");
    assert_eq!(trainer.params, before);
    assert_eq!(trainer.steps, 0);
    let first = trainer.step(batch, 1e-3).unwrap();
    close("first loss", &[first.loss as f32], &t["loss"].1);
    let mut last = first;
    for _ in 0..15 {
        last = trainer.step(batch, 1e-3).unwrap();
    }
    println!("loss {} -> {} after 16 steps", first.loss, last.loss);
    assert!(
        last.loss < 0.5 * first.loss,
        "{} -> {}",
        first.loss,
        last.loss
    );
    // The checkpoint: the weights as a diffusers folder.
    let out = common::fixtures::scratch_dir("sd-models-training");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(init.join("config.json"), out.join("config.json")).unwrap();
    trainer
        .params
        .save(&out.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let cpu = CpuBackend::new();
    let loaded = Unet2DModel::from_dir(&cpu, &out, &[Variant::Default], true).unwrap();
    let direct = Unet2DModel::from_source(&cpu, &trainer.params.source(), config).unwrap();
    let x = cpu.upload(&t["x_t"].1, &[4, 1, 16, 16]).unwrap();
    let tf: Vec<f64> = timesteps.iter().map(|&v| v as f64).collect();
    let run = |u: &Unet2DModel<CpuBackend>| {
        cpu.download(
            &u.forward(&cpu, &x, &tf, Some(ClassLabels::Ids(&labels)))
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(run(&loaded), run(&direct));
}

/// A trainer stopped after two steps and restored from its saved state into a fresh trainer
/// goes on exactly as one that never stopped (weights, EMA and AdamW's moments, bit for
/// bit); a state file that is not one, or is of another network, changes nothing.
#[test]
fn a_saved_training_state_resumes_exactly() {
    use sd_models::nn::RandomWeights;
    use sd_models::train::ddpm::{Batch, DdpmTrainer, Parameters, TrainOptions};
    use sd_models::unet::Unet2DConfig;
    use sd_schedulers::SchedulerConfig;

    let (mut straight, t, timesteps, labels) = digits_trainer();
    let (mut resumed, ..) = digits_trainer();
    let batch = Batch {
        x0: &t["x0"].1,
        noise: &t["noise"].1,
        timesteps: &timesteps,
        labels: &labels,
        shape: [4, 1, 16, 16],
    };
    let out = common::fixtures::scratch_dir("sd-models-training-state");
    std::fs::create_dir_all(&out).unwrap();
    let state = out.join("state.safetensors");
    for _ in 0..2 {
        straight.step(batch, 1e-3).unwrap();
    }
    straight.save_state(&state, "{\"run\": 1}").unwrap();
    // Not a state: the weights file of the fixture; a missing file.
    let fresh = resumed.params.clone();
    let weights = root().join("training/unet2d_init/diffusion_pytorch_model.safetensors");
    let e = resumed.load_state(&weights).unwrap_err();
    assert!(matches!(e, sd_models::Error::Config { .. }), "{e}");
    let e = resumed.load_state(&out.join("missing")).unwrap_err();
    assert!(matches!(e, sd_models::Error::Io { .. }), "{e}");
    assert_eq!(resumed.params, fresh);
    assert_eq!(resumed.steps, 0);
    assert_eq!(resumed.load_state(&state).unwrap(), "{\"run\": 1}");
    assert_eq!(resumed.steps, 2);
    for _ in 0..2 {
        let a = straight.step(batch, 5e-4).unwrap();
        let b = resumed.step(batch, 5e-4).unwrap();
        assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm));
    }
    assert_eq!(resumed.params, straight.params);
    assert_eq!(resumed.ema, straight.ema);
    // A state of another network (here: with an eleventh class) is refused.
    let mut config =
        Unet2DConfig::from_file(root().join("training/unet2d_init/config.json")).unwrap();
    config.num_class_embeds = Some(11);
    let params = Parameters::capture(&RandomWeights::new(1), &config).unwrap();
    let scheduler = SchedulerConfig::from_json(
        &std::fs::read_to_string(root().join("../assets/digits/scheduler/scheduler_config.json"))
            .unwrap(),
    )
    .unwrap();
    DdpmTrainer::new(config, params, &scheduler, TrainOptions::default())
        .unwrap()
        .save_state(&state, "")
        .unwrap();
    let e = resumed.load_state(&state).unwrap_err();
    assert!(e.to_string().contains("class_embedding.weight"), "{e}");
    assert_eq!(resumed.params, straight.params);
}

/// A batch the network cannot take is refused before any work, naming what is wrong: images
/// of another size than its `sample_size`, labels past its classes, labels missing, no
/// samples at all.
#[test]
fn a_dataset_of_another_shape_or_labels_is_refused() {
    use sd_models::train::ddpm::{Batch, drop_labels};

    let (mut trainer, t, timesteps, labels) = digits_trainer();
    let before = trainer.params.clone();
    let small = vec![0.0f32; 4 * 64];
    let cases = [
        (
            Batch {
                x0: &small,
                noise: &small,
                timesteps: &timesteps,
                labels: &labels,
                shape: [4, 1, 8, 8],
            },
            "sample_size",
        ),
        (
            Batch {
                x0: &t["x0"].1,
                noise: &t["noise"].1,
                timesteps: &timesteps,
                labels: &[1, 2, 10, 3],
                shape: [4, 1, 16, 16],
            },
            "num_class_embeds",
        ),
        (
            Batch {
                x0: &t["x0"].1,
                noise: &t["noise"].1,
                timesteps: &timesteps,
                labels: &[],
                shape: [4, 1, 16, 16],
            },
            "class-conditional",
        ),
        (
            Batch {
                x0: &[],
                noise: &[],
                timesteps: &[],
                labels: &[],
                shape: [0, 1, 16, 16],
            },
            "a batch of samples",
        ),
    ];
    for (batch, what) in cases {
        let e = trainer.step(batch, 1e-3).unwrap_err();
        assert!(matches!(e, sd_models::Error::Shape { .. }), "{e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    assert_eq!(trainer.params, before);
    // Label dropout: nothing drawn at 0; at p, the labels whose draw is below p.
    let mut l = vec![1, 2, 3, 4];
    drop_labels(&mut l, 0.0, 10, || panic!("drew at probability 0"));
    assert_eq!(l, [1, 2, 3, 4]);
    let mut draws = [0.05, 0.5, 0.09, 0.99].into_iter();
    drop_labels(&mut l, 0.1, 10, || draws.next().unwrap());
    assert_eq!(l, [10, 2, 10, 4]);
}
