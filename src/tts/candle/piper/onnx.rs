//! Reading a Piper voice's weights out of its ONNX file.
//!
//! Only the part of the ONNX format a weight reader needs is declared here, with its field
//! numbers from `onnx.proto` (prost skips every other field): the graph's initializers (the
//! weights) and its nodes (to name the weights the exporter left anonymous, and to read each
//! convolution's padding and dilation). Declaring the messages by hand keeps `protoc` out of
//! the build, so a fresh machine builds with cargo alone.
//!
//! Names: PyTorch's exporter keeps parameter names (`dec.ups.0.weight`) except where it
//! folded a weight-normalised convolution (the flow's WaveNet layers become
//! `onnx::Conv_8168`), a parameter into a constant (`exp(-logs)` of the duration predictor's
//! affine flow) or an embedding into a Gather (the text embedding is stored as `sid`). Those
//! get the name of the module that uses them, taken from the node's name
//! (`/flow/flows.0/enc/in_layers.0/Conv` → `flow.flows.0.enc.in_layers.0.weight`), so the
//! model code asks for every weight by its PyTorch name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::PiperError;

/// `ModelProto`: only the graph.
#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

/// `GraphProto`: nodes and initializers.
#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

/// `NodeProto`: what a node reads, what it is called and its integer attributes.
#[derive(Clone, PartialEq, prost::Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

/// `AttributeProto`: integer and integer-list attributes only.
#[derive(Clone, PartialEq, prost::Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
}

/// `TensorProto`: a stored tensor.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    /// 1 = EXTERNAL: the data lives in another file, which a Piper voice never does.
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// ONNX `TensorProto.DataType` values for the float types.
const ONNX_FLOAT: i32 = 1;
const ONNX_FLOAT16: i32 = 10;
const ONNX_DOUBLE: i32 = 11;
const ONNX_BFLOAT16: i32 = 16;

/// How a convolution node slides over its input, read from the graph so that every voice
/// quality (their kernels, dilations and strides differ) runs with its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvAttrs {
    pub(crate) padding: usize,
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
    pub(crate) groups: usize,
}

/// The voice's weights as Candle tensors under their PyTorch names, and each convolution's
/// attributes under its module name (`dec.resblocks.0.convs.1`).
#[derive(Debug)]
pub(crate) struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// Types of initializers that are not floats, for a precise error if one is asked for.
    non_float: HashMap<String, i32>,
    convs: HashMap<String, ConvAttrs>,
}

impl Weights {
    /// Reads `path` and puts every float initializer on `device` as `dtype`.
    pub(crate) fn read(path: &Path, device: &Device, dtype: DType) -> Result<Self, PiperError> {
        let bytes = std::fs::read(path).map_err(|e| PiperError::read(path, &e))?;
        let invalid = |reason: String| PiperError::InvalidModel {
            path: path.to_owned(),
            reason,
        };
        let model = <ModelProto as prost::Message>::decode(bytes.as_slice())
            .map_err(|e| invalid(format!("not an ONNX protobuf: {e}")))?;
        drop(bytes);
        let graph = model
            .graph
            .ok_or_else(|| invalid("the model has no graph".into()))?;
        if graph.initializer.is_empty() {
            return Err(invalid("the graph has no weights".into()));
        }
        let mut tensors = HashMap::new();
        let mut non_float = HashMap::new();
        for init in &graph.initializer {
            match to_tensor(init, device, dtype) {
                Ok(Some(t)) => {
                    tensors.insert(init.name.clone(), t);
                }
                Ok(None) => {
                    non_float.insert(init.name.clone(), init.data_type);
                }
                Err(reason) => return Err(invalid(format!("tensor `{}`: {reason}", init.name))),
            }
        }
        let mut convs = HashMap::new();
        for node in &graph.node {
            let Some(module) = module_name(&node.name) else {
                continue;
            };
            match node.op_type.as_str() {
                "Conv" | "ConvTranspose" => {
                    let attrs =
                        conv_attrs(node).map_err(|r| invalid(format!("{}: {r}", node.name)))?;
                    convs.insert(module.clone(), attrs);
                    alias(&mut tensors, node.input.get(1), format!("{module}.weight"));
                    alias(&mut tensors, node.input.get(2), format!("{module}.bias"));
                }
                // The text embedding: `Gather(table, ids)`.
                "Gather" if module == "enc_p.emb" => {
                    alias(&mut tensors, node.input.first(), "enc_p.emb.weight".into());
                }
                // The speaker embedding of multi-speaker voices.
                "Gather" if module == "emb_g" => {
                    alias(&mut tensors, node.input.first(), "emb_g.weight".into());
                }
                _ => {}
            }
        }
        // The duration predictor's affine flow runs in reverse as `(x - m) * exp(-logs)`;
        // the exporter folded `exp(-logs)` into a constant of `/dp/flows.0/Mul`.
        let affine = graph.node.iter().find(|n| n.name == "/dp/flows.0/Mul");
        if let Some(node) = affine.filter(|_| !tensors.contains_key("dp.flows.0.logs")) {
            for input in &node.input {
                alias(&mut tensors, Some(input), "dp.flows.0.exp_neg_logs".into());
            }
        }
        tracing::debug!(
            path = %path.display(),
            tensors = tensors.len(),
            convs = convs.len(),
            "read ONNX weights"
        );
        Ok(Self {
            path: path.to_owned(),
            tensors,
            non_float,
            convs,
        })
    }

    /// The ONNX file these weights came from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the model has a weight of this name.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A weight by name.
    pub(crate) fn get(&self, name: &str) -> Result<Tensor, PiperError> {
        match self.tensors.get(name) {
            Some(t) => Ok(t.clone()),
            None => Err(match self.non_float.get(name) {
                Some(&found) => PiperError::WrongDtype {
                    tensor: name.to_owned(),
                    found,
                },
                None => PiperError::MissingTensor {
                    tensor: name.to_owned(),
                },
            }),
        }
    }

    /// A weight by name, checked against the shape the rest of the model implies.
    pub(crate) fn shaped(&self, name: &str, expected: &[usize]) -> Result<Tensor, PiperError> {
        let t = self.get(name)?;
        if t.dims() != expected {
            return Err(PiperError::ShapeMismatch {
                tensor: name.to_owned(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// The attributes of the convolution that module `module` runs; a 1×1 convolution with
    /// no padding when the graph has no such node (a converted model without nodes).
    pub(crate) fn conv(&self, module: &str) -> ConvAttrs {
        self.convs.get(module).copied().unwrap_or(ConvAttrs {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        })
    }
}

/// `/flow/flows.0/enc/in_layers.0/Conv` → `flow.flows.0.enc.in_layers.0`: the module a node
/// belongs to, from PyTorch's exported node names (the last segment is the op).
fn module_name(node: &str) -> Option<String> {
    let path = node.strip_prefix('/')?;
    let (module, _op) = path.rsplit_once('/')?;
    Some(module.replace('/', "."))
}

/// Makes the weight `input` also available as `name`, unless `name` already exists.
fn alias(tensors: &mut HashMap<String, Tensor>, input: Option<&String>, name: String) {
    let Some(input) = input else { return };
    if tensors.contains_key(&name) {
        return;
    }
    if let Some(t) = tensors.get(input).cloned() {
        tensors.insert(name, t);
    }
}

fn conv_attrs(node: &NodeProto) -> Result<ConvAttrs, String> {
    let one = |name: &str| -> Result<usize, String> {
        let Some(attr) = node.attribute.iter().find(|a| a.name == name) else {
            return Ok(1);
        };
        let value = if name == "group" {
            attr.i
        } else {
            match attr.ints.as_slice() {
                [v] => *v,
                other => return Err(format!("{name} {other:?} is not one-dimensional")),
            }
        };
        usize::try_from(value).map_err(|_| format!("{name} {value} is negative"))
    };
    let padding = match node.attribute.iter().find(|a| a.name == "pads") {
        None => 0,
        Some(attr) => match attr.ints.as_slice() {
            [l, r] if l == r => usize::try_from(*l).map_err(|_| format!("pads {l} is negative"))?,
            other => return Err(format!("pads {other:?} are not symmetric 1-D pads")),
        },
    };
    Ok(ConvAttrs {
        padding,
        stride: one("strides")?,
        dilation: one("dilations")?,
        groups: one("group")?,
    })
}

/// A float initializer as a tensor; `None` for the integer constants of the graph.
fn to_tensor(init: &TensorProto, device: &Device, dtype: DType) -> Result<Option<Tensor>, String> {
    let stored = match init.data_type {
        ONNX_FLOAT => DType::F32,
        ONNX_FLOAT16 => DType::F16,
        ONNX_BFLOAT16 => DType::BF16,
        ONNX_DOUBLE => DType::F64,
        _ => return Ok(None),
    };
    if init.data_location == 1 {
        return Err("its data is in an external file".into());
    }
    let dims = init
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is negative")))
        .collect::<Result<Vec<_>, _>>()?;
    let count: usize = dims.iter().product();
    let tensor = if !init.raw_data.is_empty() {
        if init.raw_data.len() != count * stored.size_in_bytes() {
            return Err(format!(
                "{} bytes for shape {dims:?} of {stored:?}",
                init.raw_data.len()
            ));
        }
        Tensor::from_raw_buffer(&init.raw_data, stored, &dims, &Device::Cpu)
    } else if stored == DType::F32 && init.float_data.len() == count {
        Tensor::from_slice(&init.float_data, dims.as_slice(), &Device::Cpu)
    } else {
        return Err(format!("no data for shape {dims:?}"));
    };
    tensor
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(device))
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_become_module_names() {
        assert_eq!(
            module_name("/flow/flows.0/enc/in_layers.0/Conv").as_deref(),
            Some("flow.flows.0.enc.in_layers.0")
        );
        assert_eq!(module_name("/Ceil"), None);
        assert_eq!(module_name("Conv_12"), None);
    }

    #[test]
    fn conv_attributes_come_from_the_node() {
        let node = NodeProto {
            input: vec![],
            name: "/dec/resblocks.1/convs.1/Conv".into(),
            op_type: "Conv".into(),
            attribute: vec![
                AttributeProto {
                    name: "dilations".into(),
                    i: 0,
                    ints: vec![6],
                },
                AttributeProto {
                    name: "pads".into(),
                    i: 0,
                    ints: vec![12, 12],
                },
                AttributeProto {
                    name: "group".into(),
                    i: 1,
                    ints: vec![],
                },
            ],
        };
        assert_eq!(
            conv_attrs(&node),
            Ok(ConvAttrs {
                padding: 12,
                stride: 1,
                dilation: 6,
                groups: 1
            })
        );
    }
}
