//! Kokoro's weights out of its int8 ONNX export, dequantised to floats at load.
//!
//! The export (`kokoro-v1.0.int8.onnx`) was quantised dynamically: every linear layer is a
//! `MatMulInteger` and every convolution a `ConvInteger` over an 8-bit weight with a scale and
//! zero point (per output channel for most linear layers, per tensor for convolutions), each
//! LSTM a `DynamicQuantizeLSTM` (per direction), and the embedding tables `Gather` on 8-bit
//! tables followed by `DequantizeLinear`. Here each such weight becomes
//! `(q - zero_point) * scale` in f32 once, so the model runs with ordinary float kernels on
//! any device.
//!
//! Names: quantised weights lost their PyTorch names (`onnx::MatMul_6548_3_quantized`), so
//! each gets the name of the module that uses it from its node's name
//! (`/encoder/bert/encoder/albert_layer_groups.0/albert_layers.0/attention/query/MatMul_quant`
//! → `encoder.bert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight`),
//! stored in PyTorch's layout (`[out, in]` for linear layers). ALBERT's one shared layer runs
//! twelve times in the graph (`query_1` ... `query_11`); the first node names the weight.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::KokoroError;
use crate::tts::candle::error::LoadError;
use crate::tts::candle::onnx::{
    ConvAttrs, GraphProto, NodeProto, conv_attrs, decode_graph, int8_values, module_name, to_tensor,
};

/// An 8-bit initializer kept on the host until a node says how to dequantise it.
struct Quantized {
    dims: Vec<usize>,
    values: Vec<f32>,
}

/// Kokoro's weights as f32 tensors under their PyTorch-like names, and each convolution's
/// attributes under its module name.
#[derive(Debug)]
pub(crate) struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    convs: HashMap<String, ConvAttrs>,
    /// Per-tensor scales of quantised weights, by the weight's name (a quantised
    /// convolution's bias is rounded with it).
    scales: HashMap<String, f64>,
}

impl Weights {
    /// Reads `path`, dequantises every 8-bit weight and puts every weight on `device`.
    pub(crate) fn read(path: &Path, device: &Device) -> Result<Self, KokoroError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::read(path, &e))?;
        let invalid = |reason: String| KokoroError::InvalidModel {
            path: path.to_owned(),
            reason,
        };
        let graph = decode_graph(&bytes).map_err(invalid)?;
        drop(bytes);
        let mut reader = Reader::new(&graph, device).map_err(invalid)?;
        for node in &graph.node {
            reader
                .node(&graph, node)
                .map_err(|r| invalid(format!("{}: {r}", node.name)))?;
        }
        tracing::debug!(
            path = %path.display(),
            tensors = reader.tensors.len(),
            dequantised = reader.dequantised.len(),
            "read Kokoro ONNX weights"
        );
        Ok(Self {
            path: path.to_owned(),
            tensors: reader.tensors,
            convs: reader.convs,
            scales: reader.scales,
        })
    }

    /// The ONNX file these weights came from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A weight by name.
    pub(crate) fn get(&self, name: &str) -> Result<Tensor, KokoroError> {
        self.tensors.get(name).cloned().ok_or_else(|| {
            LoadError::MissingTensor {
                tensor: name.to_owned(),
            }
            .into()
        })
    }

    /// A weight by name, checked against the shape the rest of the model implies.
    pub(crate) fn shaped(&self, name: &str, expected: &[usize]) -> Result<Tensor, KokoroError> {
        let t = self.get(name)?;
        if t.dims() != expected {
            return Err(LoadError::ShapeMismatch {
                tensor: name.to_owned(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            }
            .into());
        }
        Ok(t)
    }

    /// The attributes of the convolution module `module` runs; `None` when the graph has no
    /// such node.
    pub(crate) fn conv(&self, module: &str) -> Option<ConvAttrs> {
        self.convs.get(module).copied()
    }

    /// The per-tensor scale the weight `name` was stored with, when it was quantised with one.
    pub(crate) fn scale(&self, name: &str) -> Option<f64> {
        self.scales.get(name).copied()
    }

    /// Every weight name, sorted (for diagnostics and tests).
    #[cfg(test)]
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// The state of one pass over the graph.
struct Reader<'a> {
    device: &'a Device,
    tensors: HashMap<String, Tensor>,
    quantized: HashMap<String, Quantized>,
    /// Dequantised initializers by their ONNX name, so a weight shared by several nodes
    /// (ALBERT's layer) is dequantised once.
    dequantised: HashMap<String, Tensor>,
    convs: HashMap<String, ConvAttrs>,
    scales: HashMap<String, f64>,
}

impl<'a> Reader<'a> {
    fn new(graph: &GraphProto, device: &'a Device) -> Result<Self, String> {
        let mut tensors = HashMap::new();
        let mut quantized = HashMap::new();
        for init in &graph.initializer {
            let named = |r: String| format!("tensor `{}`: {r}", init.name);
            if let Some(t) = to_tensor(init, device, DType::F32).map_err(named)? {
                tensors.insert(init.name.clone(), t);
            } else if let Some((dims, values)) = int8_values(init).map_err(named)? {
                quantized.insert(init.name.clone(), Quantized { dims, values });
            }
        }
        Ok(Self {
            device,
            tensors,
            quantized,
            dequantised: HashMap::new(),
            convs: HashMap::new(),
            scales: HashMap::new(),
        })
    }

    fn node(&mut self, graph: &GraphProto, node: &NodeProto) -> Result<(), String> {
        let Some(module) = module_name(&node.name) else {
            return Ok(());
        };
        let input = |i: usize| node.input.get(i).map(String::as_str).unwrap_or("");
        match node.op_type.as_str() {
            "MatMulInteger" => {
                let (w, zp) = (input(1), input(3));
                if self.quantized.contains_key(w) {
                    let scale = scale_name(w);
                    let t = self.dequantise(w, &scale, zp, Axis::Last)?;
                    // ONNX stores [in, out]; PyTorch's Linear is [out, in].
                    let t = t
                        .t()
                        .and_then(|t| t.contiguous())
                        .map_err(|e| e.to_string())?;
                    self.alias_stem(w, &t);
                    self.alias(&format!("{module}.weight"), t);
                }
            }
            "ConvInteger" => {
                let (w, zp) = (input(1), input(3));
                let scale = scale_name(w);
                let t = self.dequantise(w, &scale, zp, Axis::First)?;
                self.convs
                    .entry(module.clone())
                    .or_insert(conv_attrs(node)?);
                let name = format!("{module}.weight");
                if let Some(s) = self.tensors.get(&scale).filter(|s| s.elem_count() == 1) {
                    let s = s
                        .flatten_all()
                        .and_then(|s| s.to_vec1::<f32>())
                        .map_err(|e| e.to_string())?;
                    self.scales.entry(name.clone()).or_insert(f64::from(s[0]));
                }
                self.alias_stem(w, &t);
                self.alias(&name, t);
            }
            "Conv" | "ConvTranspose" => {
                self.convs
                    .entry(module.clone())
                    .or_insert(conv_attrs(node)?);
                self.alias_input(input(1), &format!("{module}.weight"));
                self.alias_input(input(2), &format!("{module}.bias"));
            }
            "MatMul" => {
                // A float linear layer whose weight is an initializer.
                if let Some(t) = self.tensors.get(input(1)).cloned() {
                    let t = t
                        .t()
                        .and_then(|t| t.contiguous())
                        .map_err(|e| e.to_string())?;
                    self.alias(&format!("{}.weight", module), t);
                }
            }
            "Gather" if self.quantized.contains_key(input(0)) => {
                // An 8-bit table, dequantised by the DequantizeLinear reading the Gather.
                let table = input(0);
                let out = node.output.first().map(String::as_str).unwrap_or("");
                let deq = graph
                    .node
                    .iter()
                    .find(|n| {
                        n.op_type == "DequantizeLinear"
                            && n.input.first().map(String::as_str) == Some(out)
                    })
                    .ok_or("no DequantizeLinear after the quantised Gather")?;
                let scale = deq.input.get(1).cloned().unwrap_or_default();
                let zp = deq.input.get(2).cloned().unwrap_or_default();
                let t = self.dequantise(table, &scale, &zp, Axis::Last)?;
                let name = table.strip_suffix("_quantized").unwrap_or(table);
                self.alias(name, t);
            }
            "DynamicQuantizeLSTM" => {
                // Inputs: X, W [dirs, in, 4H], R [dirs, H, 4H], B [dirs, 8H], lengths,
                // initial h, initial c, peepholes, W scale, W zero point, R scale, R zero point.
                let w = self.dequantise(input(1), input(8), input(9), Axis::First)?;
                let r = self.dequantise(input(2), input(10), input(11), Axis::First)?;
                // To ONNX LSTM's layout: [dirs, 4H, in] and [dirs, 4H, H], gates i, o, f, c.
                let w = w
                    .transpose(1, 2)
                    .and_then(|t| t.contiguous())
                    .map_err(|e| e.to_string())?;
                let r = r
                    .transpose(1, 2)
                    .and_then(|t| t.contiguous())
                    .map_err(|e| e.to_string())?;
                self.alias(&format!("{module}.W"), w);
                self.alias(&format!("{module}.R"), r);
                self.alias_input(input(3), &format!("{module}.B"));
            }
            _ => {}
        }
        Ok(())
    }

    /// `(q - zero_point) * scale` for the 8-bit initializer `name`, with scale and zero point
    /// per tensor (scalars) or per slice along `axis`.
    fn dequantise(
        &mut self,
        name: &str,
        scale: &str,
        zero: &str,
        axis: Axis,
    ) -> Result<Tensor, String> {
        if let Some(t) = self.dequantised.get(name) {
            return Ok(t.clone());
        }
        let q = self
            .quantized
            .get(name)
            .ok_or_else(|| format!("`{name}` is not an 8-bit weight"))?;
        let scales = self
            .tensors
            .get(scale)
            .ok_or_else(|| format!("no scale `{scale}` for `{name}`"))?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        let zeros = match self.quantized.get(zero) {
            Some(z) => z.values.clone(),
            None if zero.is_empty() => vec![0.0],
            None => return Err(format!("no zero point `{zero}` for `{name}`")),
        };
        let count = q.values.len();
        let inner = match axis {
            // One slice per index of the first dimension (output channels, directions).
            Axis::First => count / q.dims.first().copied().unwrap_or(1).max(1),
            // One value per index of the last dimension (columns of `[in, out]`).
            Axis::Last => q.dims.last().copied().unwrap_or(1),
        };
        let pick = |v: &[f32], slice: usize| -> Result<f32, String> {
            match v.len() {
                1 => Ok(v[0]),
                n if n > slice => Ok(v[slice]),
                n => Err(format!(
                    "{n} quantisation parameters for `{name}` of shape {:?}",
                    q.dims
                )),
            }
        };
        let mut out = Vec::with_capacity(count);
        for (i, &value) in q.values.iter().enumerate() {
            let slice = match axis {
                Axis::First => i / inner.max(1),
                Axis::Last => i % inner.max(1),
            };
            out.push((value - pick(&zeros, slice)?) * pick(&scales, slice)?);
        }
        let t = Tensor::from_vec(out, q.dims.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_device(self.device))
            .map_err(|e| e.to_string())?;
        self.dequantised.insert(name.to_owned(), t.clone());
        Ok(t)
    }

    /// Adds `t` as `name` unless a weight of that name exists (the first node names it).
    fn alias(&mut self, name: &str, t: Tensor) {
        self.tensors.entry(name.to_owned()).or_insert(t);
    }

    /// A quantised weight the exporter kept the name of (`encoder.predictor.F0_proj.weight`
    /// from `..._quantized`) also goes by that name, beside its bias.
    fn alias_stem(&mut self, quantised: &str, t: &Tensor) {
        if let Some(stem) = quantised
            .strip_suffix("_quantized")
            .filter(|stem| stem.ends_with(".weight"))
        {
            self.alias(stem, t.clone());
        }
    }

    fn alias_input(&mut self, input: &str, name: &str) {
        if let Some(t) = self.tensors.get(input).cloned() {
            self.alias(name, t);
        }
    }
}

/// Along which dimension a quantised weight's per-channel parameters run.
#[derive(Clone, Copy)]
enum Axis {
    First,
    Last,
}

/// `onnx::MatMul_6548_3_quantized` → `onnx::MatMul_6548_3_scale`: the quantiser names the
/// scale after the weight (the zero point may be shared and comes from the node).
fn scale_name(weight: &str) -> String {
    format!(
        "{}_scale",
        weight.strip_suffix("_quantized").unwrap_or(weight)
    )
}
