"""Speed paths behind one door: compiled training blocks, fused projections, the lean decoder and int8 matmuls.
The plain transformers path works without any of them."""
