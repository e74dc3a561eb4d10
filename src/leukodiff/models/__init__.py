"""Networks: the MobileNetV1 classifiers (level 2), their ImageNet weights, the detector."""
