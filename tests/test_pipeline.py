import numpy as np

from lungxray.data.pipeline import EpochPlan, image_batches, image_loader
from lungxray.data.records import load_dataset


def test_epoch_plan_is_seeded_and_changes_per_epoch():
    plan = EpochPlan(10, 4, seed=21, views=2)
    first = list(plan())
    assert [len(i) for i, _ in first] == [4, 4, 2]
    assert sorted(np.concatenate([i for i, _ in first])) == list(range(10))
    again = list(EpochPlan(10, 4, seed=21, views=2)())
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first, again))
    plan.epoch = 1
    second = np.concatenate([i for i, _ in plan()])
    assert (second != np.concatenate([i for i, _ in first])).any()


def test_only_training_images_are_flipped(split_folders):
    dataset = load_dataset(split_folders)
    train, test = dataset.split("train"), dataset.split("test")
    load_train = image_loader(train, 40)
    train_plan = EpochPlan(len(train), 4, seed=1, views=2)
    test_plan = EpochPlan(len(test), 4, seed=1, shuffle=False)
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
    plan = EpochPlan(len(test), 5, seed=0, shuffle=False)
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


def test_training_views_are_drawn_once_per_film_and_view(split_folders):
    """Views 2 and up are variants fixed by the film's content and the view's number; an epoch
    shows every view, and the loader shows each sample as the view the plan drew."""
    from lungxray.data.acquisition import read_views, view_names
    from lungxray.io import file_hash

    train = load_dataset(split_folders).split("train")
    hashes = [file_hash(r.path.read_bytes()) for r in train]
    assert view_names(4) == ("orig", "flip", "acq1-2", "acq1-3") and view_names(1) == ("orig",)
    original, mirror, second, third = read_views(train[0].path, [0, 1, 2, 3], hashes[0], 40)
    np.testing.assert_array_equal(mirror, original[:, ::-1])
    assert second.shape == original.shape == (40, 40, 3) and second.dtype == np.uint8
    assert not np.array_equal(second, original) and not np.array_equal(second, third)
    np.testing.assert_array_equal(read_views(train[0].path, [2], hashes[0], 40)[0], second)
    other = read_views(train[1].path, [2], hashes[1], 40)[0]
    assert not np.array_equal(other, read_views(train[1].path, [0], hashes[1], 40)[0])

    plan = EpochPlan(len(train), 4, seed=3, views=4)
    drawn = np.concatenate([views for _, views in plan()])
    assert set(drawn) <= {0, 1, 2, 3} and len(set(drawn)) > 2
    load = image_loader(train, 40, hashes=hashes)
    for indices, views in plan():
        for image, index, view in zip(load(indices, views), indices, views):
            np.testing.assert_array_equal(image, read_views(train[index].path, [int(view)], hashes[index], 40)[0])
