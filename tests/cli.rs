//! The `kimi-hybrid` binary end to end: `run` and `inspect` on the fixtures and on the
//! bundled demo checkpoint.

mod common;

use common::{fixture, golden, max_abs_diff};
use std::process::Command;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kimi-hybrid"));
    // Keep the demo checkpoint extraction inside the build tree.
    cmd.env(
        "XDG_CACHE_HOME",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cache"),
    );
    cmd
}

/// The command succeeded; otherwise fail with its stderr.
fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `generated_ids` of `run --json` output.
fn generated_ids(stdout: &[u8]) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_slice(stdout).unwrap();
    v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

/// `run` on the bundled demo checkpoint: eight greedy tokens after `ids`, as JSON, with
/// `extra` arguments.
fn eight_greedy(ids: &[u32], extra: &[&str]) -> std::process::Output {
    bin()
        .args(["run", "--prompt-ids", &ids_arg(ids)])
        .args(["--max-new-tokens", "8", "--ignore-eos", "--json"])
        .args(extra)
        .output()
        .unwrap()
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn run_json_gives_the_golden_greedy_continuation_and_logits() {
    let name = "kimi-k25-wrapper";
    let g = golden(name);
    let tmp = tempfile::tempdir().unwrap();
    let logits_path = tmp.path().join("logits.safetensors");
    let out = bin()
        .args(["run", "--model"])
        .arg(fixture(name))
        .args(["--prompt-ids", &ids_arg(&g.prompt_ids)])
        .args(["--max-new-tokens", &g.greedy_ids.len().to_string()])
        .args([
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
            "--logits-out",
        ])
        .arg(&logits_path)
        .output()
        .unwrap();
    assert_ok(&out);
    let ids = generated_ids(&out.stdout);
    assert_eq!(ids, g.greedy_ids);

    let bytes = std::fs::read(&logits_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(t.shape(), &[g.prompt_ids.len(), 512]);
    let logits: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(max_abs_diff(&logits, &g.logits) <= 2e-3);
}

#[test]
fn run_without_model_uses_the_bundled_demo() {
    let g = golden("kimi-int4");
    // `--enforce-eager` (no CUDA graphs) is accepted everywhere and changes no output.
    for extra in [&[][..], &["--enforce-eager"][..]] {
        let out = eight_greedy(&g.prompt_ids, extra);
        assert_ok(&out);
        let ids = generated_ids(&out.stdout);
        assert_eq!(ids, g.greedy_ids, "{extra:?}");
    }
}

#[test]
fn a_corrupted_demo_cache_is_rewritten() {
    // Its own cache, so the other tests' extraction is untouched.
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kimi-hybrid"));
        cmd.env("XDG_CACHE_HOME", cache.path());
        let g = golden("kimi-int4");
        let ids: Vec<String> = g.prompt_ids.iter().map(|i| i.to_string()).collect();
        let out = cmd
            .args([
                "run",
                "--prompt-ids",
                &ids.join(","),
                "--max-new-tokens",
                "8",
            ])
            .args(["--temperature", "0", "--json"])
            .output()
            .unwrap();
        assert_ok(&out);
        (generated_ids(&out.stdout), g.greedy_ids)
    };
    let (got, want) = run();
    assert_eq!(got, want);
    let demo = std::fs::read_dir(cache.path().join("kimi-hybrid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("demo-"))
        })
        .expect("the demo was extracted");
    // Same lengths, other bytes: the weights flipped, the config garbled.
    let weights = demo.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 4096..] {
        *b ^= 0x5a;
    }
    std::fs::write(&weights, &bytes).unwrap();
    let config = demo.join("config.json");
    let garbled = "#".repeat(std::fs::metadata(&config).unwrap().len() as usize);
    std::fs::write(&config, garbled).unwrap();
    let (got, want) = run();
    assert_eq!(got, want);
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed: &str| {
        let out = bin()
            .args([
                "run",
                "--prompt-ids",
                "5,6,7",
                "--max-new-tokens",
                "12",
                "--temperature",
                "1.0",
            ])
            .args(["--top-p", "0.95", "--seed", seed, "--ignore-eos", "--json"])
            .output()
            .unwrap();
        assert_ok(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("42"), run("42"));
    assert_ne!(run("42"), run("43"));
}

#[test]
fn inspect_reports_formats_and_vision_tensors() {
    let out = bin()
        .args(["inspect", "--model"])
        .arg(fixture("kimi-k25-wrapper"))
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("KimiK25ForConditionalGeneration"), "{text}");
    assert!(text.contains("routed experts   INT4 x48"), "{text}");
    assert!(text.contains("attention        BF16"), "{text}");
    assert!(text.contains("vision       3 tensors"), "{text}");
    assert!(text.contains("3 shard(s)"), "{text}");
    assert!(text.contains("unrecognised none"), "{text}");

    let out = bin()
        .args(["inspect", "--json", "--model"])
        .arg(fixture("fp8-block"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["modules"]["routed experts"]["formats"]["FP8"].is_array(),
        "{v}"
    );
    assert!(v["modules"]["router"]["formats"]["BF16"].is_array(), "{v}");
    assert!(v["dtypes"]["F8_E4M3"].is_array(), "{v}");
}

#[test]
fn bad_input_exits_with_a_message_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["run", "--prompt-ids", "1,2", "--model"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && !err.contains("panicked"),
        "{err}"
    );

    let out = bin()
        .args(["run", "--prompt-ids", "1,99999"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("99999") && err.contains("vocab") && !err.contains("panicked"),
        "{err}"
    );

    let out = bin()
        .args(["run", "--prompt-ids", "1,2", "--top-p", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-p"));

    // Workload sizes whose KV bytes would overflow (a plan once came out "feasible").
    for (flag, value) in [
        ("--context", "18446744073709551615"),
        ("--context", "0"),
        ("--concurrency", "18446744073709551615"),
    ] {
        let out = bin()
            .args(["plan", "--profile", "1xH100+512GB", flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value} planned");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && !err.contains("panicked"), "{err}");
    }
}

#[test]
fn text_commands_on_the_demo_checkpoint() {
    let out = bin()
        .args(["tokenize", "--json", "--text", "Hello <|im_end|>"])
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        *ids.last().unwrap(),
        1026,
        "<|im_end|> is special id base+2 in the demo tokenizer"
    );

    let out = bin()
        .args(["tokenize", "--plain", "--text", "<|im_end|>"])
        .output()
        .unwrap();
    let plain = String::from_utf8(out.stdout).unwrap();
    assert!(!plain.contains("1026"), "{plain}");

    let out = bin()
        .args(["detokenize", "--ids", &ids_arg(&ids)])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "Hello <|im_end|>");

    let tmp = tempfile::tempdir().unwrap();
    let messages = tmp.path().join("messages.json");
    std::fs::write(&messages, r#"[{"role": "user", "content": "hi"}]"#).unwrap();
    let out = bin()
        .args([
            "chat-template",
            "--add-generation-prompt",
            "--kwargs",
            r#"{"thinking": false}"#,
            "--messages",
        ])
        .arg(&messages)
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>"
    );

    let out = bin()
        .args([
            "run",
            "--prompt",
            "Hello",
            "--chat",
            "--max-new-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 4);
    assert!(v["text"].is_string());
    let prompt: Vec<u64> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect();
    assert_eq!(
        prompt.first(),
        Some(&(1024 + 10)),
        "the chat prompt starts with <|im_system|>"
    );

    let out = bin()
        .args(["chat-template", "--messages"])
        .arg(tmp.path().join("missing.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));
}

#[test]
fn plan_command_prints_tables_json_and_launch_commands() {
    let out = bin()
        .args(["plan", "--profile", "1xH100+512GB"])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("hybrid layout") && text.contains("570.76 GB") && text.contains("24.77 MB"),
        "{text}"
    );
    assert!(text.contains("decode, 1 sequence"), "{text}");

    let out = bin()
        .args(["plan", "--profile", "b200x8", "--emit", "vllm"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let cmd = String::from_utf8(out.stdout).unwrap();
    assert!(
        cmd.starts_with("vllm serve") && cmd.contains("--enable-expert-parallel"),
        "{cmd}"
    );
    let out = bin()
        .args([
            "plan",
            "--profile",
            "8xH200",
            "--concurrency",
            "1",
            "--emit",
            "sglang",
        ])
        .output()
        .unwrap();
    let cmd = String::from_utf8(out.stdout).unwrap();
    assert!(
        cmd.contains("--tp 8 --ep 8") && !cmd.contains("dp-attention"),
        "{cmd}"
    );

    let out = bin()
        .args(["plan", "--profile", "1xH100+512GB", "--emit", "vllm"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("all-GPU"));

    let out = bin()
        .args([
            "plan",
            "--profile",
            "cpu-only",
            "--json",
            "--context",
            "4096",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], "kimi-hybrid-plan/1");
    assert_eq!(v["workload"]["context"], 4096);

    let out = bin().args(["plan", "--profile", "auto"]).output().unwrap();
    assert_ok(&out);

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nlayout = \"auto\"\n[gpu]\ncount = \"one\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["plan", "--profile"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("count") && err.contains("line 4"),
        "{err}"
    );
    let out = bin()
        .args(["plan", "--profile", "no-such-box"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("1xH100+512GB"));
}

#[test]
fn calibrate_then_plan_with_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "Hello there, how are you?\n\nWrite a function that adds two numbers.\n",
    )
    .unwrap();
    let stats = tmp.path().join("stats.json");
    let model = fixture("kimi-int4");
    let out = bin()
        .args(["calibrate", "--generate", "2", "--model"])
        .arg(&model)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&stats)
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(v["format"], "kimi-hybrid-expert-stats/1");
    let tokens = v["tokens"].as_u64().unwrap();
    for layer in ["1", "2"] {
        let counts: u64 = v["layers"][layer]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(
            counts,
            tokens * 2,
            "layer {layer}: top-2 routing of every token"
        );
    }
    let out = bin()
        .args(["plan", "--profile", "cpu-only", "--json", "--model"])
        .arg(&model)
        .arg("--stats")
        .arg(&stats)
        .output()
        .unwrap();
    assert_ok(&out);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["workload"]["stats"], true);
}

#[test]
fn backends_are_chosen_by_name() {
    let g = golden("kimi-int4");
    for backend in ["reference", "cpu", "cpu:scalar", "cpu-int8"] {
        let out = eight_greedy(&g.prompt_ids, &["--backend", backend]);
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if backend != "cpu-int8" {
            let ids = generated_ids(&out.stdout);
            assert_eq!(ids, g.greedy_ids, "{backend}");
        }
    }
    let out = bin()
        .args(["run", "--backend", "gpu", "--prompt-ids", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend"));
    // The GPU backend: greedy like the others where a GPU exists, a clear refusal where
    // none does.
    let out = eight_greedy(&g.prompt_ids, &["--backend", "cuda"]);
    if out.status.success() {
        assert_eq!(generated_ids(&out.stdout), g.greedy_ids, "cuda");
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no CUDA device"), "{err}");
        assert!(err.contains("--backend cpu"), "{err}");
    }
}

#[test]
fn serve_and_run_with_a_gpu_profile_refuse_to_start_without_that_gpu() {
    if let Ok(gpu) = kimi_hybrid::device::cuda::CudaBackend::open(0) {
        // With a GPU, `serve` would start and keep serving.
        eprintln!("skipping the refusal check: {} is present", gpu.gpu().name);
        return;
    }
    for args in [
        vec!["serve", "--profile", "1xH100+512GB", "--port", "0"],
        vec!["run", "--profile", "b200x8", "--prompt-ids", "1,2"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("GPU"), "{err}");
        assert!(err.contains("--profile cpu-only"), "{err}");
    }
    // A CPU profile places the experts and runs.
    let out = bin()
        .args([
            "run",
            "--profile",
            "cpu-only",
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
}

/// Every built-in GPU profile's layout on stand-in GPUs (`--simulate-gpus`) generates
/// the demo's greedy continuation.
#[test]
fn gpu_profiles_run_on_simulated_gpus() {
    let g = golden("kimi-int4");
    for profile in ["1xH100+512GB", "2xRTX6000Pro+768GB", "b200x8", "4xH100"] {
        let out = bin()
            .args([
                "run",
                "--profile",
                profile,
                "--simulate-gpus",
                "--prompt-ids",
                &ids_arg(&g.prompt_ids),
                "--max-new-tokens",
                "8",
                "--ignore-eos",
                "--json",
            ])
            .output()
            .unwrap();
        assert_ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("simulating the plan's"), "{profile}: {err}");
        assert_eq!(generated_ids(&out.stdout), g.greedy_ids, "{profile}");
    }
}

#[test]
fn gpu_benchmark_reports_or_says_why_not() {
    let out = bin()
        .args(["bench", "gpu", "--repeats", "2"])
        .output()
        .unwrap();
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in ["device copy bandwidth", "MLA decode", "INT4 expert matmul"] {
            assert!(text.contains(needle), "{text}");
        }
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no CUDA device"), "{err}");
    }
}

#[test]
fn engine_bench_reports_prompt_and_generation_speed() {
    let out = bin()
        .args(["bench", "-p", "16", "-n", "4", "-c", "1,2"])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "pp16:",
        "tg4:",
        "c1: aggregate decode",
        "c2: aggregate decode",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}
