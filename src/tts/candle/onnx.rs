//! The part of the ONNX format a weight reader needs, for every family published as ONNX
//! (Piper, Kokoro).
//!
//! The messages are declared by hand with their field numbers from `onnx.proto` (prost skips
//! every other field): the graph's initializers (the weights) and its nodes (to name the
//! weights the exporter left anonymous and to read attributes). Declaring them here keeps
//! `protoc` out of the build, so a fresh machine builds with cargo alone.

use candle_core::{DType, Device, Tensor};

/// `ModelProto`: only the graph.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ModelProto {
    #[prost(message, optional, tag = "7")]
    pub(crate) graph: Option<GraphProto>,
}

/// `GraphProto`: nodes and initializers.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub(crate) node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    pub(crate) initializer: Vec<TensorProto>,
}

/// `NodeProto`: what a node reads and writes, what it is called and its attributes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub(crate) input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub(crate) output: Vec<String>,
    #[prost(string, tag = "3")]
    pub(crate) name: String,
    #[prost(string, tag = "4")]
    pub(crate) op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub(crate) attribute: Vec<AttributeProto>,
}

/// `AttributeProto`: float, integer and integer-list attributes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct AttributeProto {
    #[prost(string, tag = "1")]
    pub(crate) name: String,
    #[prost(float, tag = "2")]
    pub(crate) f: f32,
    #[prost(int64, tag = "3")]
    pub(crate) i: i64,
    #[prost(int64, repeated, tag = "8")]
    pub(crate) ints: Vec<i64>,
}

/// `TensorProto`: a stored tensor.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub(crate) dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub(crate) data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub(crate) float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub(crate) int32_data: Vec<i32>,
    #[prost(string, tag = "8")]
    pub(crate) name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub(crate) raw_data: Vec<u8>,
    /// 1 = EXTERNAL: the data lives in another file, which neither Piper nor Kokoro does.
    #[prost(int32, tag = "14")]
    pub(crate) data_location: i32,
}

/// How a convolution node slides over its input, read from the graph so that every voice
/// quality (their kernels, dilations and strides differ) runs with its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvAttrs {
    pub(crate) padding: usize,
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
    pub(crate) groups: usize,
}

/// ONNX `TensorProto.DataType` values.
const ONNX_FLOAT: i32 = 1;
const ONNX_UINT8: i32 = 2;
const ONNX_INT8: i32 = 3;
const ONNX_FLOAT16: i32 = 10;
const ONNX_DOUBLE: i32 = 11;
const ONNX_BFLOAT16: i32 = 16;

/// Reads and decodes an ONNX file's graph; the error is the reason, for the family's own
/// "invalid model" variant (the caller maps I/O errors itself).
pub(crate) fn decode_graph(bytes: &[u8]) -> Result<GraphProto, String> {
    let model = <ModelProto as prost::Message>::decode(bytes)
        .map_err(|e| format!("not an ONNX protobuf: {e}"))?;
    let graph = model.graph.ok_or("the model has no graph")?;
    if graph.initializer.is_empty() {
        return Err("the graph has no weights".into());
    }
    Ok(graph)
}

/// `/flow/flows.0/enc/in_layers.0/Conv` → `flow.flows.0.enc.in_layers.0`: the module a node
/// belongs to, from PyTorch's exported node names (the last segment is the op).
pub(crate) fn module_name(node: &str) -> Option<String> {
    let path = node.strip_prefix('/')?;
    let (module, _op) = path.rsplit_once('/')?;
    Some(module.replace('/', "."))
}

fn dims_of(init: &TensorProto) -> Result<Vec<usize>, String> {
    init.dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is negative")))
        .collect()
}

/// A float initializer as a tensor; `None` for the integer constants of the graph.
pub(crate) fn to_tensor(
    init: &TensorProto,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>, String> {
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
    let dims = dims_of(init)?;
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

/// An 8-bit tensor's shape and values (as f32).
pub(crate) type Int8Values = (Vec<usize>, Vec<f32>);

/// An 8-bit integer initializer (int8 or uint8, the quantised weights and their zero points)
/// as f32 values on the host, with its shape; `None` for other types.
pub(crate) fn int8_values(init: &TensorProto) -> Result<Option<Int8Values>, String> {
    let signed = match init.data_type {
        ONNX_INT8 => true,
        ONNX_UINT8 => false,
        _ => return Ok(None),
    };
    let dims = dims_of(init)?;
    let count: usize = dims.iter().product();
    let values: Vec<f32> = if !init.raw_data.is_empty() {
        if init.raw_data.len() != count {
            return Err(format!(
                "{} bytes for shape {dims:?} of 8-bit integers",
                init.raw_data.len()
            ));
        }
        init.raw_data
            .iter()
            .map(|&b| {
                if signed {
                    f32::from(i8::from_ne_bytes([b]))
                } else {
                    f32::from(b)
                }
            })
            .collect()
    } else if init.int32_data.len() == count {
        // Small 8-bit tensors may be stored widened in `int32_data` (values fit in i16).
        init.int32_data
            .iter()
            .map(|&v| f32::from(i16::try_from(v).unwrap_or(0)))
            .collect()
    } else {
        return Err(format!("no data for shape {dims:?}"));
    };
    Ok(Some((dims, values)))
}

/// A convolution node's attributes (ConvInteger has Conv's).
pub(crate) fn conv_attrs(node: &NodeProto) -> Result<ConvAttrs, String> {
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
