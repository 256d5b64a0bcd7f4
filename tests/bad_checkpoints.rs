//! Broken checkpoints are refused at load time with an error naming the problem
//! (file, tensor, field), never a panic and never mid-generation.

mod common;

use common::fixture;
use kimi_hybrid::model::Model;
use kimi_hybrid::weights::Checkpoint;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

/// Loads checkpoint and model; returns the error text (test fails if loading succeeds).
fn load_error(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Err(e) => e.to_string(),
        Ok(ckpt) => match Model::load(&ckpt) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        },
    }
}

/// Rewrites a safetensors file, letting `edit` drop a tensor (None) or change its dtype/shape.
fn rewrite(path: &Path, edit: impl Fn(&str, Dtype, Vec<usize>) -> Option<(Dtype, Vec<usize>)>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        if let Some((dtype, shape)) = edit(&name, view.dtype(), view.shape().to_vec()) {
            tensors.push((
                name.clone(),
                TensorView::new(dtype, shape, view.data()).unwrap(),
            ));
        }
    }
    safetensors::serialize_to_file(tensors, None, path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let victim = "model.layers.2.mlp.experts.5.down_proj.weight_scale";
    rewrite(&dir.join("model.safetensors"), |n, d, s| {
        (n != victim).then_some((d, s))
    });
    let e = load_error(&dir);
    assert!(e.contains(victim) && e.contains("missing"), "{e}");
}

#[test]
fn missing_linear_weight_is_named() {
    let (_tmp, dir) = copy_fixture("kimi-bf16-yarn32");
    let victim = "model.layers.1.self_attn.kv_b_proj.weight";
    rewrite(&dir.join("model.safetensors"), |n, d, s| {
        (n != victim).then_some((d, s))
    });
    let e = load_error(&dir);
    assert!(e.contains(victim), "{e}");
}

#[test]
fn wrong_shape_is_named_with_file() {
    let (_tmp, dir) = copy_fixture("kimi-bf16-yarn32");
    let victim = "model.layers.0.mlp.down_proj.weight";
    rewrite(&dir.join("model.safetensors"), |n, d, s| {
        Some(if n == victim {
            (d, vec![s[1], s[0]])
        } else {
            (d, s)
        })
    });
    let e = load_error(&dir);
    assert!(
        e.contains(victim) && e.contains("shape") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let victim = "model.layers.1.mlp.experts.0.gate_proj.weight_packed";
    rewrite(&dir.join("model.safetensors"), |n, d, s| {
        Some(if n == victim { (Dtype::F32, s) } else { (d, s) })
    });
    let e = load_error(&dir);
    assert!(
        e.contains(victim) && e.contains("dtype") && e.contains("I32"),
        "{e}"
    );
}

#[test]
fn int4_weight_shape_record_must_agree() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let victim = "model.layers.1.mlp.experts.3.up_proj.weight_shape";
    // Reinterpret the I64 [2] record as I32 [4]: the values no longer read [out, in].
    rewrite(&dir.join("model.safetensors"), |n, d, s| {
        Some(if n == victim {
            (Dtype::I32, vec![4])
        } else {
            (d, s)
        })
    });
    let e = load_error(&dir);
    assert!(e.contains(victim), "{e}");
}

#[test]
fn truncated_shard_is_found_at_open() {
    let (_tmp, dir) = copy_fixture("kimi-k25-wrapper");
    let shard = dir.join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    file.set_len(len - 100).unwrap();
    let e = Checkpoint::open(&dir)
        .err()
        .expect("truncated shard must fail to open")
        .to_string();
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn corrupt_header_length_is_reported() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn garbage_header_is_reported() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..20].copy_from_slice(b"not json at!");
    std::fs::write(&path, bytes).unwrap();
    let e = load_error(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("header"),
        "{e}"
    );
}

/// Rewrites a safetensors file's header through `edit`, keeping its data as they are.
fn edit_header(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    edit(&mut header);
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_header_entry_the_format_refuses_is_named() {
    let victim = "model.layers.2.mlp.experts.5.down_proj.weight_scale";
    for (what, change) in [
        ("needs", serde_json::json!({"shape": [3, 1000]})),
        ("unknown dtype", serde_json::json!({"dtype": "Q9"})),
        (
            "of U64 needs 512 bytes",
            serde_json::json!({"dtype": "U64"}),
        ),
        (
            "of F8_E8M0 needs 64 bytes",
            serde_json::json!({"dtype": "F8_E8M0"}),
        ),
        (
            "10000 dimensions",
            serde_json::json!({"shape": vec![1; 10000]}),
        ),
    ] {
        let (_tmp, dir) = copy_fixture("kimi-int4");
        edit_header(&dir.join("model.safetensors"), |h| {
            for (k, v) in change.as_object().unwrap() {
                h[victim][k] = v.clone();
            }
        });
        let e = load_error(&dir);
        assert!(
            e.contains("model.safetensors") && e.contains(victim) && e.contains(what),
            "{e}"
        );
    }
}

#[test]
fn malformed_config_json_is_reported() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = load_error(&dir);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

#[test]
fn config_value_inconsistent_with_weights_is_reported() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["kv_lora_rank"] = 40.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let e = load_error(&dir);
    assert!(
        e.contains("kv_a_proj_with_mqa") || e.contains("kv_a_layernorm"),
        "{e}"
    );
}

#[test]
fn index_listing_the_wrong_shard_is_reported() {
    let (_tmp, dir) = copy_fixture("kimi-k25-wrapper");
    let path = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let map = v["weight_map"].as_object_mut().unwrap();
    let (name, file) = map
        .iter()
        .next()
        .map(|(k, f)| (k.clone(), f.as_str().unwrap().to_string()))
        .unwrap();
    let other = if file.contains("00001") {
        "model-00002-of-00003.safetensors"
    } else {
        "model-00001-of-00003.safetensors"
    };
    map.insert(name.clone(), other.into());
    std::fs::write(&path, v.to_string()).unwrap();
    let e = load_error(&dir);
    assert!(e.contains(&name) && e.contains("index"), "{e}");
}

#[test]
fn index_naming_a_missing_shard_is_reported() {
    let (_tmp, dir) = copy_fixture("kimi-k25-wrapper");
    std::fs::remove_file(dir.join("model-00003-of-00003.safetensors")).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("model-00003-of-00003.safetensors"), "{e}");
}

#[test]
fn malformed_index_is_reported() {
    let (_tmp, dir) = copy_fixture("kimi-k25-wrapper");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        "{\"weight_map\": 3}",
    )
    .unwrap();
    let e = load_error(&dir);
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("weight_map"),
        "{e}"
    );
}

#[test]
fn empty_directory_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_error(tmp.path());
    assert!(e.contains("config.json"), "{e}");
    std::fs::copy(
        fixture("kimi-int4").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let e = load_error(tmp.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn packed_module_listed_in_ignore_is_inconsistent() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["quantization_config"]["ignore"]
        .as_array_mut()
        .unwrap()
        .push("re:.*experts.*".into());
    std::fs::write(&path, v.to_string()).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("ignore") && e.contains("weight_packed"), "{e}");
}

#[test]
fn packed_weights_without_quantization_config_are_inconsistent() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&path, v.to_string()).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("quantization_config"), "{e}");
}

#[test]
fn out_of_vocabulary_token_is_an_error() {
    let ckpt = Checkpoint::open(&fixture("kimi-int4")).unwrap();
    let model = Model::load(&ckpt).unwrap();
    let mut cache = kimi_hybrid::model::KvCache::new(&model.config);
    let reference: &dyn kimi_hybrid::forward::Forward = &kimi_hybrid::forward::on_cpu(
        std::sync::Arc::new(kimi_hybrid::device::cpu::kernels::ReferenceBackend),
    );
    let e = reference
        .forward(
            &model,
            &[1, 100_000],
            &mut cache,
            kimi_hybrid::model::AttentionForm::Auto,
            kimi_hybrid::model::Logits::Last,
        )
        .expect_err("token 100000 is outside a 512-token vocabulary");
    assert!(e.to_string().contains("100000"), "{e}");
    assert_eq!(
        cache.len(),
        0,
        "a rejected request leaves the cache untouched"
    );
}

#[test]
fn inspect_separates_mtp_layers_from_unrecognised_tensors() {
    let (_tmp, dir) = copy_fixture("kimi-bf16-yarn32");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let extra = vec![0u8; 8];
    let mut tensors: Vec<(String, TensorView)> = st.tensors();
    tensors.push((
        "model.layers.3.eh_proj.weight".into(),
        TensorView::new(Dtype::BF16, vec![2, 2], &extra).unwrap(),
    ));
    tensors.push((
        "something.else".into(),
        TensorView::new(Dtype::BF16, vec![4], &extra).unwrap(),
    ));
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let report = kimi_hybrid::inspect::inspect(&ckpt);
    assert!(report.problem.is_none(), "{:?}", report.problem);
    assert_eq!((report.mtp_tensors, report.mtp_bytes), (1, 8));
    assert_eq!(report.unrecognised, vec!["something.else".to_string()]);
}

/// A named pipe in place of a checkpoint's or tokenizer's file is refused at once, naming
/// the file (opening it for reading would wait for a writer forever).
#[test]
fn a_named_pipe_in_place_of_a_file_is_refused_at_once() {
    use kimi_hybrid::tokenizer::Tokenizer;
    use std::sync::mpsc;
    use std::time::Duration;
    for victim in ["config.json", "model.safetensors", "tiktoken.model"] {
        let (_tmp, dir) = copy_fixture("kimi-int4");
        let path = dir.join(victim);
        std::fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let (tx, rx) = mpsc::channel();
        let d = dir.clone();
        std::thread::spawn(move || {
            let e = match victim {
                "tiktoken.model" => Tokenizer::from_dir(&d).err().map(|e| e.to_string()),
                _ => Some(load_error(&d)),
            };
            let _ = tx.send(e);
        });
        let e = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{victim}: loading hangs on a named pipe"))
            .unwrap_or_else(|| panic!("{victim}: a named pipe was accepted"));
        assert!(
            e.contains(victim) && e.contains("named pipe"),
            "{victim}: {e}"
        );
    }
}

/// Overwrites the first bytes of a tensor's data in place.
fn poke(path: &Path, tensor: &str, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    data[start..start + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn verify_names_tensors_with_non_finite_values_and_unusable_scales() {
    let (_tmp, dir) = copy_fixture("kimi-int4");
    let clean = kimi_hybrid::inspect::verify(&Checkpoint::open(&dir).unwrap(), &|_| {});
    assert!(clean.bad.is_empty(), "{clean}");
    assert!(clean.tensors > 100);
    let shard = dir.join("model.safetensors");
    // BF16 NaN and +inf in the embeddings, a zero scale in one expert's down_proj.
    poke(
        &shard,
        "model.embed_tokens.weight",
        &[0xc0, 0x7f, 0x80, 0x7f],
    );
    poke(
        &shard,
        "model.layers.1.mlp.experts.0.down_proj.weight_scale",
        &[0, 0],
    );
    // It still loads: these are values, not format errors. --verify is what finds them.
    assert!(Model::load(&Checkpoint::open(&dir).unwrap()).is_ok());
    let checked = kimi_hybrid::inspect::verify(&Checkpoint::open(&dir).unwrap(), &|_| {});
    let text = checked.to_string();
    assert_eq!(checked.bad.len(), 2, "{text}");
    assert_eq!(checked.bad[0].tensor, "model.embed_tokens.weight");
    assert_eq!(checked.bad[0].non_finite, 2);
    assert_eq!(
        checked.bad[1].tensor,
        "model.layers.1.mlp.experts.0.down_proj.weight_scale"
    );
    assert_eq!(checked.bad[1].non_positive_scales, 1);
    assert!(text.contains("model.safetensors"), "{text}");
    // The command exits with an error naming the count.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kimi-hybrid"))
        .args(["inspect", "--verify", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 of"),
        "{out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 tensors hold non-finite values"));
}
