//! Converts a BERT sentence embedder shipped as ONNX into the
//! sentence-transformers folder mycel loads (safetensors, `config.json`,
//! pooling settings), losslessly: every weight is FP32 in both.
//!
//! An ONNX file is a protobuf `ModelProto`; only the few fields needed
//! are read (the graph's nodes and initializers), by a small reader here
//! rather than a protobuf code generator. Exporters name most weights after
//! the PyTorch module (`...encoder.layer.0.attention.self.query.bias`) but
//! leave the matrices of `MatMul` nodes anonymous (`onnx::MatMul_470`) and
//! transposed (`[in, out]`): each is named by following its `MatMul` to the
//! `Add` of the bias it feeds, and transposed back to PyTorch's `[out, in]`.
//!
//! The output is written by [`write_safetensors`] with its tensors in name
//! order, so the same ONNX file always gives the same bytes: the converted
//! weights' digest is the model's identity in the swarm, pinned in
//! `fetch.rs`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use serde_json::json;

/// What the ONNX graph does not say and the folder needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertLayout {
    /// Attention heads per layer (hidden in the graph's reshapes).
    pub heads: usize,
    /// Longest input in tokens the model was trained for.
    pub max_seq_length: usize,
    /// Whether sentence vectors are L2-normalised after mean pooling.
    pub normalize: bool,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// The file is not a protobuf this reader understands.
    #[error("{0}: not a readable ONNX file ({1})")]
    Malformed(String, String),
    /// The graph is not a BERT encoder with FP32 weights.
    #[error("{0}: {1}")]
    Unsupported(String, String),
    /// File system error.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// One weight of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Its shape.
    pub dims: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// One node of the graph: what it computes from what.
#[derive(Debug, Clone, Default, PartialEq)]
struct Node {
    op: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Float attributes by name (`epsilon`).
    floats: HashMap<String, f32>,
}

/// A protobuf message's fields, read lazily.
struct Fields<'a> {
    bytes: &'a [u8],
}

/// A field's value by wire type.
enum Value<'a> {
    Varint(u64),
    /// Skipped: no field read here is 64-bit fixed.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.bytes.split_first().ok_or("truncated varint")?;
            self.bytes = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.bytes.len() {
            return Err(format!("field of {n} bytes with {} left", self.bytes.len()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next field number and value, `None` at the end.
    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length overflows")?;
                Value::Bytes(self.take(len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "fixed32")?)),
            other => return Err(format!("wire type {other} (groups are not used by ONNX)")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn text(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
}

/// ONNX's `TensorProto.DataType.FLOAT`.
const FLOAT: u64 = 1;

fn read_tensor(bytes: &[u8]) -> Result<(String, Tensor), String> {
    let (mut name, mut dims, mut data_type, mut raw, mut floats) = (String::new(), Vec::new(), 0, None, Vec::new());
    let mut fields = Fields::new(bytes);
    while let Some((field, value)) = fields.next_field()? {
        match (field, value) {
            (1, Value::Varint(d)) => dims.push(usize::try_from(d).map_err(|_| "dimension overflows")?),
            (1, Value::Bytes(packed)) => {
                let mut p = Fields::new(packed);
                while !p.bytes.is_empty() {
                    dims.push(usize::try_from(p.varint()?).map_err(|_| "dimension overflows")?);
                }
            }
            (2, Value::Varint(t)) => data_type = t,
            (4, Value::Fixed32(f)) => floats.push(f32::from_bits(f)),
            (4, Value::Bytes(packed)) => {
                floats.extend(packed.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
            (8, Value::Bytes(n)) => name = text(n)?,
            (9, Value::Bytes(r)) => raw = Some(r),
            (13, _) => return Err(format!("tensor {name:?} keeps its data in an external file")),
            (14, Value::Varint(1)) => return Err(format!("tensor {name:?} keeps its data in an external file")),
            _ => {}
        }
    }
    if data_type != FLOAT {
        return Err(format!("tensor {name:?} has data type {data_type}, not FP32"));
    }
    let values = match raw {
        Some(raw) if raw.len() % 4 == 0 => {
            raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        Some(_) => return Err(format!("tensor {name:?}: raw data is not a whole number of floats")),
        None => floats,
    };
    let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or("tensor size overflows")?;
    if count != values.len() {
        return Err(format!("tensor {name:?} has shape {dims:?} but {} values", values.len()));
    }
    Ok((name, Tensor { dims, values }))
}

fn read_node(bytes: &[u8]) -> Result<Node, String> {
    let mut node = Node::default();
    let mut fields = Fields::new(bytes);
    while let Some((field, value)) = fields.next_field()? {
        match (field, value) {
            (1, Value::Bytes(s)) => node.inputs.push(text(s)?),
            (2, Value::Bytes(s)) => node.outputs.push(text(s)?),
            (4, Value::Bytes(s)) => node.op = text(s)?,
            (5, Value::Bytes(attribute)) => {
                let (mut name, mut float) = (String::new(), None);
                let mut a = Fields::new(attribute);
                while let Some((field, value)) = a.next_field()? {
                    match (field, value) {
                        (1, Value::Bytes(s)) => name = text(s)?,
                        (2, Value::Fixed32(f)) => float = Some(f32::from_bits(f)),
                        _ => {}
                    }
                }
                if let Some(f) = float {
                    node.floats.insert(name, f);
                }
            }
            _ => {}
        }
    }
    Ok(node)
}

/// The graph's initializers (by name) and nodes.
fn read_graph(bytes: &[u8]) -> Result<(BTreeMap<String, Tensor>, Vec<Node>), String> {
    let mut model = Fields::new(bytes);
    let mut graph = None;
    while let Some((field, value)) = model.next_field()? {
        if let (7, Value::Bytes(g)) = (field, value) {
            graph = Some(g);
        }
    }
    let graph = graph.ok_or("no graph")?;
    let (mut weights, mut nodes) = (BTreeMap::new(), Vec::new());
    let mut fields = Fields::new(graph);
    while let Some((field, value)) = fields.next_field()? {
        match (field, value) {
            (1, Value::Bytes(n)) => nodes.push(read_node(n)?),
            (5, Value::Bytes(t)) => {
                let (name, tensor) = read_tensor(t)?;
                weights.insert(name, tensor);
            }
            _ => {}
        }
    }
    Ok((weights, nodes))
}

/// The BERT weights of an ONNX file, under Hugging Face's names
/// (`embeddings.word_embeddings.weight`, `encoder.layer.0...`), matrices
/// as `[out, in]`; and the layer-norm epsilon.
pub fn bert_weights(path: &Path) -> Result<(BTreeMap<String, Tensor>, f32), OnnxError> {
    let shown = path.display().to_string();
    let bytes = fs::read(path).map_err(|e| OnnxError::Io(shown.clone(), e))?;
    let (initializers, nodes) = read_graph(&bytes).map_err(|e| OnnxError::Malformed(shown.clone(), e))?;
    let unsupported = |why: String| OnnxError::Unsupported(shown.clone(), why);
    // Every Add by the value it adds to.
    let mut add_of: HashMap<&str, &Node> = HashMap::new();
    for node in nodes.iter().filter(|n| n.op == "Add") {
        for input in &node.inputs {
            add_of.insert(input, node);
        }
    }
    let mut named: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, tensor) in &initializers {
        if name.ends_with(".weight") || name.ends_with(".bias") {
            named.insert(name.clone(), tensor.clone());
        }
    }
    for node in nodes.iter().filter(|n| n.op == "MatMul") {
        let [_, weight] = node.inputs.as_slice() else { continue };
        let Some(tensor) = initializers.get(weight) else { continue };
        if weight.ends_with(".weight") {
            continue;
        }
        let bias = node
            .outputs
            .first()
            .and_then(|out| add_of.get(out.as_str()))
            .and_then(|add| add.inputs.iter().find(|i| i.ends_with(".bias") && initializers.contains_key(*i)))
            .ok_or_else(|| unsupported(format!("matrix {weight} feeds no bias Add, so it cannot be named")))?;
        let &[rows, cols] = tensor.dims.as_slice() else {
            return Err(unsupported(format!("matrix {weight} has shape {:?}", tensor.dims)));
        };
        let mut transposed = vec![0f32; rows * cols];
        for (r, row) in tensor.values.chunks_exact(cols).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                transposed[c * rows + r] = v;
            }
        }
        let name = format!("{}.weight", bias.trim_end_matches(".bias"));
        if named.insert(name.clone(), Tensor { dims: vec![cols, rows], values: transposed }).is_some() {
            return Err(unsupported(format!("two matrices would both be {name}")));
        }
    }
    // Drop the exporter's module path (`model.0.auto_model.`).
    let mut weights = BTreeMap::new();
    for (name, tensor) in named {
        let Some(at) = ["embeddings.", "encoder.", "pooler."].iter().filter_map(|p| name.find(p)).min() else {
            continue;
        };
        weights.insert(name[at..].to_string(), tensor);
    }
    let eps = nodes
        .iter()
        .find(|n| n.op == "LayerNormalization")
        .map_or(1e-5, |n| n.floats.get("epsilon").copied().unwrap_or(1e-5));
    for required in ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"] {
        if !weights.contains_key(required) {
            return Err(unsupported(format!("no {required}: not a BERT encoder")));
        }
    }
    Ok((weights, eps))
}

/// Writes `model.safetensors`, `config.json` and the sentence-transformers
/// files for the ONNX BERT at `onnx` into `out` (created).
pub fn convert_bert(onnx: &Path, out: &Path, layout: &BertLayout) -> Result<(), OnnxError> {
    let shown = onnx.display().to_string();
    let (weights, eps) = bert_weights(onnx)?;
    let unsupported = |why: String| OnnxError::Unsupported(shown.clone(), why);
    let dims = |name: &str| weights.get(name).map(|t| t.dims.clone()).unwrap_or_default();
    let (&[vocab, hidden], &[positions, _]) = (
        dims("embeddings.word_embeddings.weight").as_slice(),
        dims("embeddings.position_embeddings.weight").as_slice(),
    ) else {
        return Err(unsupported("embedding tables are not matrices".into()));
    };
    let layers = (0..).take_while(|i| weights.contains_key(&format!("encoder.layer.{i}.output.dense.bias"))).count();
    let intermediate = dims("encoder.layer.0.intermediate.dense.weight").first().copied().unwrap_or(0);
    let type_vocab = dims("embeddings.token_type_embeddings.weight").first().copied().unwrap_or(0);
    if layers == 0 || intermediate == 0 || !hidden.is_multiple_of(layout.heads) {
        return Err(unsupported(format!("{layers} layers, {intermediate} wide, {hidden} hidden")));
    }
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e| OnnxError::Io(what, e)
    };
    fs::create_dir_all(out.join("1_Pooling")).map_err(io(out))?;
    write_safetensors(&weights, &out.join("model.safetensors")).map_err(io(out))?;
    let config = json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        // Training-only settings, as Hugging Face's defaults: loaders expect them.
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "use_cache": true,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "layer_norm_eps": eps,
        "max_position_embeddings": positions,
        "num_attention_heads": layout.heads,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": type_vocab,
        "vocab_size": vocab,
        "converted_from": onnx.file_name().map(|n| n.to_string_lossy().into_owned()),
    });
    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if layout.normalize {
        modules.push(
            json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}),
        );
    }
    let pooling = json!({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
    });
    let st = json!({"max_seq_length": layout.max_seq_length, "do_lower_case": false});
    for (file, value) in [
        ("config.json", config),
        ("modules.json", json!(modules)),
        ("1_Pooling/config.json", pooling),
        ("sentence_bert_config.json", st),
    ] {
        let path = out.join(file);
        let text = serde_json::to_string_pretty(&value).map_err(|e| OnnxError::Io(file.into(), e.into()))?;
        fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(())
}

/// Writes F32 tensors as a safetensors file, in name order with no
/// metadata, so equal tensors always give equal bytes.
pub fn write_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let len = t.values.len() * 4;
        // Members in name order, as the digest pinned in fetch.rs was
        // taken (serde_json keeps insertion order in this workspace).
        header.insert(name.clone(), json!({"data_offsets": [offset, offset + len], "dtype": "F32", "shape": t.dims}));
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    // The data starts 8-byte aligned, padded with spaces as the format allows.
    while !(header.len() + 8).is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    for t in tensors.values() {
        bytes.extend(t.values.iter().flat_map(|v| v.to_le_bytes()));
    }
    fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding, just enough to build test graphs.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn tensor(name: &str, dims: &[u64], values: &[f32]) -> Vec<u8> {
        let mut t = Vec::new();
        for &d in dims {
            varint(1 << 3, &mut t);
            varint(d, &mut t);
        }
        varint(2 << 3, &mut t);
        varint(FLOAT, &mut t);
        bytes_field(8, name.as_bytes(), &mut t);
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes_field(9, &raw, &mut t);
        t
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            bytes_field(1, i.as_bytes(), &mut n);
        }
        for o in outputs {
            bytes_field(2, o.as_bytes(), &mut n);
        }
        bytes_field(4, op.as_bytes(), &mut n);
        n
    }

    fn model(nodes: &[Vec<u8>], initializers: &[Vec<u8>]) -> Vec<u8> {
        let mut g = Vec::new();
        for n in nodes {
            bytes_field(1, n, &mut g);
        }
        for t in initializers {
            bytes_field(5, t, &mut g);
        }
        let mut m = Vec::new();
        varint(1 << 3, &mut m); // ir_version, ignored
        varint(8, &mut m);
        bytes_field(7, &g, &mut m);
        m
    }

    #[test]
    fn anonymous_matrices_are_named_by_their_bias_and_transposed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let p = "model.0.auto_model.";
        let bytes = model(
            &[
                node("MatMul", &["x", "onnx::MatMul_7"], &["q"]),
                node("Add", &[&format!("{p}encoder.layer.0.attention.self.query.bias"), "q"], &["y"]),
            ],
            &[
                tensor(&format!("{p}embeddings.word_embeddings.weight"), &[3, 2], &[1., 2., 3., 4., 5., 6.]),
                tensor(&format!("{p}embeddings.position_embeddings.weight"), &[1, 2], &[7., 8.]),
                tensor(&format!("{p}encoder.layer.0.attention.self.query.bias"), &[3], &[0., 0., 1.]),
                // [in = 2, out = 3]
                tensor("onnx::MatMul_7", &[2, 3], &[1., 2., 3., 4., 5., 6.]),
            ],
        );
        fs::write(&path, bytes).unwrap();
        let (w, eps) = bert_weights(&path).unwrap();
        assert_eq!(eps, 1e-5, "the ONNX default without a LayerNormalization");
        let q = &w["encoder.layer.0.attention.self.query.weight"];
        assert_eq!(q.dims, vec![3, 2]);
        assert_eq!(q.values, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(w["embeddings.word_embeddings.weight"].values, vec![1., 2., 3., 4., 5., 6.]);
        assert!(!w.keys().any(|k| k.contains("onnx::") || k.starts_with("model.")), "{:?}", w.keys());

        // Same tensors, same bytes.
        let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
        write_safetensors(&w, &a).unwrap();
        write_safetensors(&w, &b).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        let loaded = candle_core::safetensors::load(&a, &candle_core::Device::Cpu).unwrap();
        let q = loaded["encoder.layer.0.attention.self.query.weight"].to_vec2::<f32>().unwrap();
        assert_eq!(q, vec![vec![1., 4.], vec![2., 5.], vec![3., 6.]]);
    }

    #[test]
    fn truncated_and_foreign_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let good = model(&[], &[tensor("model.embeddings.word_embeddings.weight", &[1, 2], &[1., 2.])]);
        for cut in [1, 5, good.len() / 2, good.len() - 1] {
            fs::write(&path, &good[..cut]).unwrap();
            assert!(bert_weights(&path).is_err(), "cut at {cut}");
        }
        fs::write(&path, b"\x0f\xff\xff\xff").unwrap();
        assert!(matches!(bert_weights(&path), Err(OnnxError::Malformed(..))));
        // Whole, but not a BERT.
        fs::write(&path, &good).unwrap();
        let err = bert_weights(&path).unwrap_err();
        assert!(err.to_string().contains("not a BERT"), "{err}");
    }
}
