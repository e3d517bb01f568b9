"""mvportrait.export: exportable networks, ONNX export, TensorRT engines, artifact cache.

=================  ===========================================================================
module             what it holds
=================  ===========================================================================
``spec``           :class:`ExportSpec` per network: names, dtypes, dynamic axes, sample inputs,
                   min / opt / max shapes (``stage2_specs``, ``stage1_specs``)
``networks``       flat-signature wrappers (tensors in, tensors out) sharing the models' weights
``onnx``           export -> external data -> onnx.checker + shape inference -> ORT parity
``cache``          artifact cache keyed by hash(graph, shapes, precision, options, versions, GPU)
``tensorrt``       TensorRT 10 engine build and runtime wrapper (unverified: no TensorRT here)
=================  ===========================================================================

Depends on ``models`` and ``kernels`` only; ``engine/backends.py`` puts these behind the pipelines.
"""
