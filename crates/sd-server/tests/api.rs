//! The server on the tiny fixture pipeline (`fixtures/pipeline/sd1`), started on a loopback
//! port and driven over HTTP: both APIs, progress while a job runs, interrupt, a full queue,
//! bad requests, the API key, and a client that disconnects. Nothing sleeps for a fixed time
//! to wait for a state: each wait polls with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sd_models::CpuBackend;
use sd_models::pipeline::{Image, LoadOptions, StableDiffusion};
use sd_server::api::{GenerationInfo, Health, ImagesResponse, OpenAiResponse, ProgressResponse};
use sd_server::{App, ServerOptions};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A running server; stopped (gracefully) when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn tiny() -> StableDiffusion<CpuBackend> {
    StableDiffusion::from_dir(
        CpuBackend::new(),
        fixtures().join("pipeline/sd1"),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn start(configure: impl FnOnce(&mut ServerOptions)) -> Server {
    start_with(tiny(), configure)
}

fn start_with(
    pipe: StableDiffusion<CpuBackend>,
    configure: impl FnOnce(&mut ServerOptions),
) -> Server {
    let mut options = ServerOptions::new("tiny-sd1");
    options.max_steps = 2000;
    options.lora_dir = Some(fixtures().join("lora"));
    configure(&mut options);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            App::new(pipe, options)
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    Server {
        addr: addr_rx.recv().unwrap(),
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// One HTTP/1.1 exchange (`Connection: close`): the status, the headers and the body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[line + 2..line + 2 + n]);
        b = &b[line + 2 + n + 2..];
    }
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, b) = request(addr, "POST", path, &[], body.to_string().as_bytes());
    (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn get<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> T {
    let (status, _, b) = request(addr, "GET", path, &[], b"");
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&b));
    serde_json::from_slice(&b).unwrap()
}

/// Polls `check` until it holds, for at most 60 s.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn png(image: &str) -> Image {
    let bytes = STANDARD.decode(image).unwrap();
    Image::decode(&bytes, Default::default()).unwrap()
}

/// A request that keeps the worker busy until interrupted or cancelled.
fn long_job() -> Value {
    json!({"prompt": "a fox", "steps": 1000, "width": 512, "height": 512, "seed": 1,
           "sampler_name": "Euler"})
}

#[test]
fn txt2img_img2img_and_openai_answer_with_images() {
    let s = start(|_| {});
    let health: Health = get(s.addr, "/health");
    assert_eq!(health.status, "ok");
    let (status, v) = post(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a (red:1.2) fox", "steps": 3, "width": 64, "height": 48, "seed": 7,
                "batch_size": 2, "sampler_name": "Euler a", "cfg_scale": 6, "extra_field": true}),
    );
    assert_eq!(status, 200, "{v}");
    let r: ImagesResponse = serde_json::from_value(v).unwrap();
    assert_eq!(r.images.len(), 2);
    let first = png(&r.images[0]);
    assert_eq!((first.width(), first.height()), (64, 48));
    let info: GenerationInfo = serde_json::from_str(&r.info).unwrap();
    assert_eq!(info.all_seeds, [7, 8]);
    assert_eq!(r.parameters["extra_field"], true);
    // Each image comes from its own seed: the second alone, from seed 8, is the same image.
    let (_, again) = post(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a (red:1.2) fox", "steps": 3, "width": 64, "height": 48, "seed": 8,
                "sampler_name": "Euler a", "cfg_scale": 6}),
    );
    assert_eq!(again["images"][0], r.images[1]);
    // seed -1: a seed is drawn and reported.
    let (_, v) = post(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": -1}),
    );
    let info: GenerationInfo = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert!(info.seed <= u64::from(u32::MAX));

    // img2img, from a data URL, resized to the size asked for; and inpainting with a mask.
    let data_url = format!("data:image/png;base64,{}", r.images[0]);
    let (status, v) = post(
        s.addr,
        "/sdapi/v1/img2img",
        &json!({"prompt": "a fox", "init_images": [data_url], "denoising_strength": 0.5,
                "steps": 4, "width": 32, "height": 32, "seed": 3}),
    );
    assert_eq!(status, 200, "{v}");
    let out = png(v["images"][0].as_str().unwrap());
    assert_eq!((out.width(), out.height()), (32, 32));
    let mask = Image::filled(64, 48, [255, 255, 255]).unwrap();
    let mask = STANDARD.encode(mask.to_png().unwrap());
    let (status, v) = post(
        s.addr,
        "/sdapi/v1/img2img",
        &json!({"prompt": "a fox", "init_images": [r.images[0]], "mask": mask,
                "denoising_strength": 1.0, "steps": 2, "seed": 3}),
    );
    assert_eq!(status, 200, "{v}");
    let out = png(v["images"][0].as_str().unwrap());
    assert_eq!((out.width(), out.height()), (64, 48));

    // OpenAI's API.
    let (status, v) = post(
        s.addr,
        "/v1/images/generations",
        &json!({"prompt": "a fox", "n": 1, "size": "64x64", "response_format": "b64_json"}),
    );
    assert_eq!(status, 200, "{v}");
    let r: OpenAiResponse = serde_json::from_value(v).unwrap();
    assert_eq!(png(&r.data[0].b64_json).width(), 64);

    // The lists clients read.
    let samplers: Vec<Value> = get(s.addr, "/sdapi/v1/samplers");
    assert!(samplers.iter().any(|x| x["name"] == "DPM++ 2M Karras"));
    assert!(!samplers.iter().any(|x| x["name"] == "DDIMScheduler"));
    let schedulers: Vec<Value> = get(s.addr, "/sdapi/v1/schedulers");
    assert_eq!(schedulers[1]["name"], "karras");
    let scripts: Value = get(s.addr, "/sdapi/v1/scripts");
    assert_eq!(scripts["txt2img"], json!([]));
    let (status, _, b) = request(s.addr, "GET", "/sdapi/v1/nothing", &[], b"");
    assert_eq!(
        (status, b.as_slice()),
        (404, br#"{"detail":"Not Found"}"#.as_slice())
    );
    let models: Vec<Value> = get(s.addr, "/sdapi/v1/sd-models");
    assert_eq!(models[0]["model_name"], "tiny-sd1");
    let options: Value = get(s.addr, "/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], "tiny-sd1");
    let health: Health = get(s.addr, "/health");
    assert_eq!((health.served, health.failed, health.cancelled), (6, 0, 0));
}

#[test]
fn bad_requests_are_400_with_the_reason() {
    let s = start(|o| o.max_side = 256);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("/sdapi/v1/txt2img", b"{not json".to_vec(), "not JSON"),
        (
            "/sdapi/v1/txt2img",
            br#"{"steps": "many"}"#.to_vec(),
            "does not fit",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"width": 100000}"#.to_vec(),
            "width",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"width": 100, "height": 64}"#.to_vec(),
            "multiple of 8",
        ),
        ("/sdapi/v1/txt2img", br#"{"steps": 0}"#.to_vec(), "steps"),
        ("/sdapi/v1/txt2img", br#"{"steps": 5000}"#.to_vec(), "steps"),
        (
            "/sdapi/v1/txt2img",
            br#"{"batch_size": 5, "n_iter": 5}"#.to_vec(),
            "images",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"sampler_name": "Warp drive"}"#.to_vec(),
            "sampler",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "<lora:../../etc/passwd:1>", "steps": 1}"#.to_vec(),
            "file name",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "<lora:missing:1>", "steps": 1}"#.to_vec(),
            "missing",
        ),
        (
            "/sdapi/v1/img2img",
            br#"{"init_images": []}"#.to_vec(),
            "init_images",
        ),
        (
            "/sdapi/v1/img2img",
            br#"{"init_images": ["%%%"]}"#.to_vec(),
            "base64",
        ),
        (
            "/sdapi/v1/img2img",
            br#"{"init_images": ["aGVsbG8="]}"#.to_vec(),
            "init_images[0]",
        ),
        (
            "/v1/images/generations",
            br#"{"prompt": "x", "size": "big"}"#.to_vec(),
            "WIDTHxHEIGHT",
        ),
        (
            "/v1/images/generations",
            br#"{"prompt": "x", "response_format": "url"}"#.to_vec(),
            "b64_json",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"scheduler": "exponential"}"#.to_vec(),
            "karras",
        ),
    ];
    let long = json!({"prompt": "x".repeat(9000), "steps": 1})
        .to_string()
        .into_bytes();
    let mut cases = cases;
    cases.push(("/sdapi/v1/txt2img", long, "bytes"));
    cases.push((
        "/sdapi/v1/txt2img",
        br#"{"steps": 1, "override_settings": {"CLIP_stop_at_last_layers": 18446744073709551615}}"#
            .to_vec(),
        "CLIP_stop_at_last_layers",
    ));
    cases.push((
        "/sdapi/v1/txt2img",
        br#"{"prompt": "<lora:C:evil:1>", "steps": 1}"#.to_vec(),
        "file name",
    ));
    for (path, body, needle) in cases {
        let (status, _, b) = request(s.addr, "POST", path, &[], &body);
        let text = String::from_utf8_lossy(&b);
        assert_eq!(
            status,
            400,
            "{path} {}: {text}",
            String::from_utf8_lossy(&body)
        );
        assert!(text.contains(needle), "{path}: {text} lacks {needle:?}");
    }
    // OpenAI's clients read `error.message`.
    let (status, v) = post(
        s.addr,
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "65x64"}),
    );
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("width = 65"),
        "{v}"
    );
    // A PNG that claims more pixels than the limits allow: refused before decoding.
    let mut bomb = Image::filled(8, 8, [0, 0, 0]).unwrap().to_png().unwrap();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let body = json!({"init_images": [STANDARD.encode(&bomb)], "steps": 1});
    let (status, v) = post(s.addr, "/sdapi/v1/img2img", &body);
    assert_eq!(status, 400, "{v}");
    // A body past the cap.
    let s2 = start(|o| o.body_limit = 1000);
    let big = json!({"prompt": "x".repeat(5000)});
    let (status, _) = post(s2.addr, "/sdapi/v1/txt2img", &big);
    assert_eq!(status, 413);
    let health: Health = get(s.addr, "/health");
    assert_eq!(health.served, 0);
}

#[test]
fn an_api_key_is_checked_on_every_request() {
    let s = start(|o| o.api_key = Some("sekrit".into()));
    for path in ["/health", "/sdapi/v1/samplers"] {
        let (status, head, _) = request(s.addr, "GET", path, &[], b"");
        assert_eq!(status, 401, "{path}");
        assert!(head.to_ascii_lowercase().contains("www-authenticate"));
        let (status, _, _) = request(
            s.addr,
            "GET",
            path,
            &[("Authorization", "Bearer wrong")],
            b"",
        );
        assert_eq!(status, 401);
        let (status, _, _) = request(
            s.addr,
            "GET",
            path,
            &[("Authorization", "Bearer sekrit")],
            b"",
        );
        assert_eq!(status, 200);
    }
    // AUTOMATIC1111 clients' basic auth, the key as the password.
    let basic = format!("Basic {}", STANDARD.encode("user:sekrit"));
    let (status, _, _) = request(s.addr, "GET", "/health", &[("Authorization", &basic)], b"");
    assert_eq!(status, 200);
    let body = json!({"prompt": "x", "steps": 1, "width": 64, "height": 64}).to_string();
    let (status, _, _) = request(s.addr, "POST", "/sdapi/v1/txt2img", &[], body.as_bytes());
    assert_eq!(status, 401);
}

#[test]
fn progress_interrupt_and_a_full_queue() {
    let s = start(|o| o.queue = 1);
    let addr = s.addr;
    let running = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &long_job()));
    // Progress while it runs.
    let mut seen: Option<ProgressResponse> = None;
    wait_until("the job to make progress", || {
        let p: ProgressResponse = get(addr, "/sdapi/v1/progress");
        let moving = p.state.sampling_step > 0 && p.progress > 0.0;
        if moving {
            seen = Some(p);
        }
        moving
    });
    let p = seen.unwrap();
    assert_eq!(p.state.job, "txt2img");
    assert_eq!(p.state.sampling_steps, 1000);
    assert!(p.progress < 1.0 && p.eta_relative >= 0.0);
    // One more waits in the queue (capacity 1); the next is refused with Retry-After.
    let queued = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &long_job()));
    wait_until("the second job to be queued", || {
        get::<Health>(addr, "/health").queued == 1
    });
    let body = long_job().to_string();
    let (status, head, _) = request(addr, "POST", "/sdapi/v1/txt2img", &[], body.as_bytes());
    assert_eq!(status, 503);
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 10"),
        "{head}"
    );
    // Interrupt: the running job answers with the image of the steps run.
    let (status, _) = post(addr, "/sdapi/v1/interrupt", &json!({}));
    assert_eq!(status, 200);
    let (status, v) = running.join().unwrap();
    assert_eq!(status, 200, "{v}");
    let info: GenerationInfo = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert!(info.interrupted);
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    // Then the queued one runs; interrupt it too.
    wait_until("the queued job to start", || {
        get::<ProgressResponse>(addr, "/sdapi/v1/progress")
            .state
            .sampling_step
            > 0
    });
    post(addr, "/sdapi/v1/interrupt", &json!({}));
    let (status, _) = queued.join().unwrap();
    assert_eq!(status, 200);
    let idle: ProgressResponse = get(addr, "/sdapi/v1/progress");
    assert_eq!((idle.progress, idle.state.job.as_str()), (0.0, ""));
}

#[test]
fn a_client_that_disconnects_cancels_its_job() {
    let s = start(|_| {});
    let body = long_job().to_string();
    let mut stream = TcpStream::connect(s.addr).unwrap();
    write!(
        stream,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until("the job to start", || {
        get::<ProgressResponse>(s.addr, "/sdapi/v1/progress")
            .state
            .sampling_step
            > 0
    });
    drop(stream);
    wait_until("the job to be cancelled", || {
        let h: Health = get(s.addr, "/health");
        h.cancelled == 1 && !h.busy
    });
    // The server goes on serving.
    let (status, _) = post(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a fox", "steps": 1, "width": 64, "height": 64}),
    );
    assert_eq!(status, 200);
}

#[test]
fn shutdown_cancels_the_running_job_and_answers_it() {
    let s = start(|_| {});
    let addr = s.addr;
    let running = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &long_job()));
    wait_until("the job to start", || {
        get::<ProgressResponse>(addr, "/sdapi/v1/progress")
            .state
            .sampling_step
            > 0
    });
    drop(s);
    let (status, v) = running.join().unwrap();
    assert_eq!(status, 503, "{v}");
}

/// The ControlNet extension's units drive the server's ControlNets.
#[test]
fn controlnet_units_drive_the_servers_controlnets() {
    let pipe = tiny()
        .load_controlnet(fixtures().join("controlnet/sd1"), &LoadOptions::default())
        .unwrap();
    let s = start_with(pipe, |_| {});
    let edges = Image::filled(32, 32, [255, 255, 255]).unwrap();
    let edges = STANDARD.encode(edges.to_png().unwrap());
    let scripts: Value = get(s.addr, "/sdapi/v1/scripts");
    assert_eq!(scripts["txt2img"], json!(["controlnet"]));
    // As clients send it: "ControlNet", units with a model name and a null mask.
    let request = |units: Value| {
        json!({"prompt": "a house", "steps": 2, "width": 64, "height": 64, "seed": 1,
               "alwayson_scripts": {"ControlNet": {"args": units}}})
    };
    let unit = |extra: Value| {
        let mut u = json!({"image": edges, "module": "none", "weight": 0.8, "model": "None",
                           "mask": null});
        u.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        u
    };
    let (status, v) = post(
        s.addr,
        "/sdapi/v1/txt2img",
        &request(json!([unit(json!({}))])),
    );
    assert_eq!(status, 200, "{v}");
    let with = v["images"][0].clone();
    let (_, v) = post(
        s.addr,
        "/sdapi/v1/txt2img",
        &request(json!([unit(json!({"weight": 0.0}))])),
    );
    assert_ne!(v["images"][0], with, "the unit's weight acts");
    for (units, needle) in [
        (json!([]), "ControlNet units"),
        (json!([unit(json!({"enabled": false}))]), "ControlNet units"),
        (json!([unit(json!({"module": "canny"}))]), "preprocessor"),
        (json!([{"weight": 1.0}]), "no image"),
        (
            json!([unit(json!({"guidance_start": 0.9, "guidance_end": 0.1}))]),
            "window",
        ),
    ] {
        let (status, v) = post(s.addr, "/sdapi/v1/txt2img", &request(units));
        assert_eq!(status, 400, "{v}");
        assert!(v["detail"].as_str().unwrap().contains(needle), "{v}");
    }
}
