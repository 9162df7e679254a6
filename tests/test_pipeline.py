import numpy as np

from lungxray.data.pipeline import EpochPlan, image_batches, image_loader
from lungxray.data.records import load_dataset


def test_epoch_plan_is_seeded_and_changes_per_epoch():
    plan = EpochPlan(10, 4, seed=21, flip=True)
    first = list(plan())
    assert [len(i) for i, _ in first] == [4, 4, 2]
    assert sorted(np.concatenate([i for i, _ in first])) == list(range(10))
    again = list(EpochPlan(10, 4, seed=21, flip=True)())
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first, again))
    plan.epoch = 1
    second = np.concatenate([i for i, _ in plan()])
    assert (second != np.concatenate([i for i, _ in first])).any()


def test_only_training_images_are_flipped(split_folders):
    dataset = load_dataset(split_folders)
    train, test = dataset.split("train"), dataset.split("test")
    load_train = image_loader(train, 40)
    train_plan = EpochPlan(len(train), 4, seed=1, flip=True)
    test_plan = EpochPlan(len(test), 4, seed=1, flip=False, shuffle=False)
    flipped = 0
    for indices, flips in train_plan():
        images = load_train(indices, flips)
        for image, index, flip in zip(images, indices, flips):
            original = load_train(np.array([index]), np.array([False]))[0]
            expected = original[:, ::-1] if flip else original
            np.testing.assert_array_equal(image, expected)
            flipped += bool(flip) and not np.array_equal(original, original[:, ::-1])
    assert flipped > 0
    for indices, flips in test_plan():
        assert not flips.any()


def test_evaluation_batches_keep_order_and_labels(split_folders):
    dataset = load_dataset(split_folders)
    test = dataset.split("test")
    labels = dataset.labels(test)
    plan = EpochPlan(len(test), 5, seed=0, flip=False, shuffle=False)
    data = image_batches(plan, image_loader(test, 40), labels, len(dataset.classes), (40, 40, 3))
    seen_labels, seen_images = [], []
    for x, y in data:
        seen_labels += list(np.argmax(y.numpy(), axis=1))
        seen_images.append(x.numpy())
    assert seen_labels == list(labels)
    # the blob position encodes the class: check the pixels belong to the labelled class
    images = np.concatenate(seen_images)
    blob_column = images[:, 15:25, :, 0].mean(axis=1).argmax(axis=1)
    assert list(np.digitize(blob_column, [16, 24])) == list(labels)
    assert images.dtype == np.float32 and images.max() <= 255 and images.min() >= 0
