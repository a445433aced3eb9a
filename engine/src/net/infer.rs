//! Inference: a net's output without recording anything to differentiate. A convolution
//! whose output only feeds an activation, and that activation's only a pooling layer (either
//! may be missing), runs them on each output plane while the plane is in cache, instead of
//! three passes over the whole batch's activations (see `ops::conv::Epilogue`).

use super::record::Recording;
use super::{Layer, Net, NormStats};
use crate::error::Result;
use crate::ops::conv::{conv2d_fused, Epilogue};
use crate::ops::pool::PlanePool;
use crate::ops::BatchStats;
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;

/// A convolution and the layers fused after it: the epilogue and the last node it covers.
struct Fusion<T> {
    epilogue: Epilogue<T>,
    covers: Vec<usize>,
}

impl Net {
    /// The output of the net for `x: [N, ...input_shape]` at the parameter values `params`
    /// (in [`Net::params`] order) and, with batch statistics, every BatchNorm layer's
    /// statistics: the output value of [`Net::record`], bit for bit, without the tape's
    /// backward state. Evaluation (loss and accuracy) goes through here.
    pub fn infer<T: Scalar>(
        &self,
        params: &[&Tensor<T>],
        x: &Tensor<T>,
        norm: &NormStats<'_, T>,
    ) -> Result<(Tensor<T>, Vec<BatchStats<T>>)> {
        self.check_inputs(x.shape(), params.len(), norm)?;
        let mut tape = Tape::new(0);
        let vars: Vec<Var> = params.iter().map(|&p| tape.constant(p.clone())).collect();
        let xv = tape.constant(x.clone());
        let readers = self.sole_readers();
        let mut rec = Recording::new(self, true);
        let mut fused: Vec<Option<Var>> = vec![None; self.len()];
        for (i, node) in self.nodes().iter().enumerate() {
            if let Some(v) = fused[i] {
                rec.vars.push(v);
                continue;
            }
            let v = match self.fusion_at(i, &readers, &tape, &rec) {
                Some(f) => {
                    let x = tape.value(rec.vars[node.inputs[0].0]);
                    let w = tape.value(vars[node.first_param]);
                    let b =
                        (node.params().len() > 1).then(|| tape.value(vars[node.first_param + 1]));
                    let (stride, pad) = match node.layer {
                        Layer::Conv2d {
                            stride, padding, ..
                        } => (stride, padding),
                        _ => unreachable!("fusions start at a convolution"),
                    };
                    match conv2d_fused(x, w, b, stride, pad, f.epilogue)? {
                        Some(y) => {
                            let v = tape.constant(y);
                            f.covers.iter().for_each(|&j| fused[j] = Some(v));
                            v
                        }
                        None => self.record_node(&mut tape, node, &vars, xv, norm, &mut rec)?,
                    }
                }
                None => self.record_node(&mut tape, node, &vars, xv, norm, &mut rec)?,
            };
            rec.vars.push(v);
        }
        let out = tape
            .value(*rec.vars.last().expect("a net has its input"))
            .clone();
        Ok((out, rec.batch_stats))
    }

    /// The fusion that starts at node `i`: a convolution followed by its sole reader when that
    /// is an activation, then by that one's sole reader when it is a pooling layer. `None`
    /// when `i` is not a convolution or nothing follows it to fuse.
    fn fusion_at<T: Scalar>(
        &self,
        i: usize,
        readers: &[Option<usize>],
        tape: &Tape<T>,
        rec: &Recording<T>,
    ) -> Option<Fusion<T>> {
        let node = &self.nodes()[i];
        if !matches!(node.layer, Layer::Conv2d { .. }) {
            return None;
        }
        let mut epilogue = Epilogue {
            act: None,
            pool: None,
        };
        let mut covers = Vec::new();
        let mut last = i;
        if let Some(j) = readers[i] {
            if let Layer::Activation(f) = self.nodes()[j].layer {
                epilogue.act = Some(f.unary());
                covers.push(j);
                last = j;
            }
        }
        if let Some(k) = readers[last] {
            let n = tape.value(rec.vars[node.inputs[0].0]).shape()[0];
            let mut shape = vec![n];
            shape.extend_from_slice(&node.shape);
            let pool = match self.nodes()[k].layer {
                Layer::MaxPool2d { kernel, stride } => PlanePool::new(true, &shape, kernel, stride),
                Layer::AvgPool2d { kernel, stride } => {
                    PlanePool::new(false, &shape, kernel, stride)
                }
                _ => return Some(Fusion { epilogue, covers }).filter(|f| !f.covers.is_empty()),
            };
            if let Ok(p) = pool {
                epilogue.pool = Some(p);
                covers.push(k);
            }
        }
        Some(Fusion { epilogue, covers }).filter(|f| !f.covers.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{isa, Isa};
    use crate::net::ConvOptions;

    /// conv → relu → max-pool fuses whole; a convolution read twice fuses nothing; where the
    /// packing-free kernel runs (AVX2+FMA or AVX-512) the fused product runs (elsewhere the
    /// ops run one by one).
    #[test]
    fn fusions_cover_sole_readers_and_run_with_the_vector_kernels() {
        let pad1 = ConvOptions {
            padding: 1,
            ..ConvOptions::default()
        };
        let mut net = Net::new(&[3, 8, 8]);
        let c = net.conv2d("c", net.input(), 16, 3, pad1).unwrap();
        let r = net.relu(c).unwrap();
        let p = net.max_pool2d(r, 2, 2).unwrap();
        let d = net.conv2d("d", p, 16, 3, pad1).unwrap();
        let s = net.relu(d).unwrap();
        net.add(d, s).unwrap();
        let mut tape = Tape::<f32>::new(0);
        let x = tape.constant(Tensor::zeros(&[2, 3, 8, 8]));
        let mut rec = Recording::new(&net, true);
        rec.vars.push(x);
        let readers = net.sole_readers();
        let f = net
            .fusion_at(c.0, &readers, &tape, &rec)
            .expect("conv-relu-pool");
        assert_eq!(f.covers, vec![r.0, p.0]);
        assert!(f.epilogue.act.is_some() && f.epilogue.pool.is_some());
        assert!(net.fusion_at(d.0, &readers, &tape, &rec).is_none());
        assert!(net.fusion_at(r.0, &readers, &tape, &rec).is_none());
        let w = Tensor::<f32>::zeros(&[16, 3, 3, 3]);
        let y = conv2d_fused(tape.value(x), &w, None, 1, 1, f.epilogue).unwrap();
        let vector = isa() >= Isa::Avx2;
        assert_eq!(y.is_some(), vector);
        assert_eq!(
            y.map(|y| y.shape().to_vec()),
            vector.then(|| vec![2, 16, 4, 4])
        );
    }
}
