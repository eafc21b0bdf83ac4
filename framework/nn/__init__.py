"""Building blocks for models: layers that techniques control (`DropPath`) and kernels they rely on."""
