"""tillsight training: ResNet50 age model (Keras 3). Not built yet: see the training issue."""
