"""Each chapter's own helpers, in a module named like its notebook.

==================================  ===================================================================
notebook                            helpers (``ptcourse.chapters.<name>``)
==================================  ===================================================================
``01_autoencoders``                 a validation split carved from the training split, few-label subsets of the rest
``02_contrastive_learning``         batched per-image augmentation, SimCLR views, a CIFAR ResNet
``03_bert_finetuning``              tokenised datasets, dynamic-padding collate, length-grouped batches,
                                    MLM masking, the TF-IDF + logistic-regression baseline
``04_resnet_transfer``              ImageNet weights, partial freezing, discriminative LRs, Grad-CAM,
                                    class-split sources, pretraining, BatchNorm re-estimation, ``%%run_if``
``05_knowledge_distillation``       per-image random translation, size and latency, int8 quantization by hand
``06_language_model_pretraining``   the pretraining corpus without evaluation leaks, a split by source sentence
``07_parameter_efficient_finetuning``  parameter groups, optimizer-state memory, saved size, representation drift
``08_interview_questions``          ``evidence()``: the recorded values an interview answer cites
==================================  ===================================================================

Their exercise checks are in ``ptcourse.checks.<name>`` and their tests in ``tests/test_<name>.py``.

Example:
    >>> from ptcourse.chapters.bert_finetuning import pad_collate
"""
