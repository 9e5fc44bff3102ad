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

use crate::tts::candle::error::LoadError;
pub(crate) use crate::tts::candle::onnx::ConvAttrs;
use crate::tts::candle::onnx::{ModelProto, conv_attrs, module_name, to_tensor};

use super::error::PiperError;

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
        let bytes = std::fs::read(path).map_err(|e| LoadError::read(path, &e))?;
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

    /// Weights made in a test, with each convolution's attributes by module name.
    #[cfg(test)]
    pub(crate) fn for_tests(
        tensors: HashMap<String, Tensor>,
        convs: HashMap<String, ConvAttrs>,
    ) -> Self {
        Self {
            path: PathBuf::from("test"),
            tensors,
            non_float: HashMap::new(),
            convs,
        }
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
                Some(&found) => LoadError::WrongDtype {
                    tensor: name.to_owned(),
                    found: format!("ONNX type {found}"),
                },
                None => LoadError::MissingTensor {
                    tensor: name.to_owned(),
                },
            }
            .into()),
        }
    }

    /// A weight by name, checked against the shape the rest of the model implies.
    pub(crate) fn shaped(&self, name: &str, expected: &[usize]) -> Result<Tensor, PiperError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tts::candle::onnx::{AttributeProto, NodeProto};

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
        let attr = |name: &str, i: i64, ints: Vec<i64>| AttributeProto {
            name: name.into(),
            i,
            ints,
            ..Default::default()
        };
        let node = NodeProto {
            name: "/dec/resblocks.1/convs.1/Conv".into(),
            op_type: "Conv".into(),
            attribute: vec![
                attr("dilations", 0, vec![6]),
                attr("pads", 0, vec![12, 12]),
                attr("group", 1, vec![]),
            ],
            ..Default::default()
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
