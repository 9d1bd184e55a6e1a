"""The Linux CPU fast path: OpenBLAS and our forwarding library behind MLX's float32 products, and
leaner CPU versions of MLX's fused ops. None of it acts on Metal or CUDA, where MLX's own kernels win."""
