"""The offline demo (`vlm-judge demo`): part of the command layer, so it may reach every package
(the data builder, training, evaluation); `demo.run` is the pipeline, `demo.assemble` builds its
small LLaVA judge base from pretrained parts."""
