"""Pre-annotations: the boxes detect.py counted, written as the labelling tools read them, to be corrected there.

    $ python detect.py my_fields/ --save-labels voc --output-dir my_counts   # my_counts/labels/voc/<image>.xml

The files reference the original images (not the annotated copies) by their file names, as the tools match them:
  * voc: labels/voc/<image stem>.xml, Pascal VOC, one per image (LabelImg: Open Dir = the images' folder, Change
    Save Dir = labels/voc; CVAT: import "Pascal VOC 1.1", the .xml files zipped under Annotations/). Boxes in
    pixels of the upright image, as detections.json has them (0.1 px); LabelImg reads them as int(float(text)).
  * yolo: labels/yolo/obj_train_data/<image stem>.txt, one line a box, "class cx cy w h" in fractions of the image
    (written exactly: read back within 1e-9 px), with classes.txt beside them (LabelImg's YOLO mode: Change Save Dir
    = that folder), and obj.names, obj.data and train.txt (CVAT: import "YOLO 1.1", labels/yolo zipped) and
    data.yaml (Ultralytics: the class names).
  * coco: labels/coco.json, one COCO file: images by file name and size, boxes [x, y, width, height] in pixels,
    categories numbered from 1 in the model's order (CVAT: import "COCO 1.0"; Label Studio's COCO importer).
A label file is named after the annotated copy (output_names: distinct where two images share a file name). Written
when the run ends whole.
"""
import json
import os
from xml.sax.saxutils import escape

from misc import write_text_atomic

FORMATS = ("voc", "yolo", "coco")


def write_labels(fmt, folder, items, classes):
    """Write the pre-annotations of `fmt` in folder/labels. items: (the original image's file name, the stem of its
    label file, its record of detections.json: width, height, boxes in pixels, labels by class name) for every image;
    classes: the model's class names in label order."""
    root = os.path.join(folder, "labels")
    if fmt == "coco":
        write_text_atomic(json.dumps(coco(items, classes), ensure_ascii=False, indent=1) + "\n",
                          os.path.join(root, "coco.json"))
        return
    for name, stem, record in items:
        if fmt == "voc":
            write_text_atomic(voc(name, record), os.path.join(root, "voc", stem + ".xml"))
        else:
            write_text_atomic(yolo(record, classes), os.path.join(root, "yolo", "obj_train_data", stem + ".txt"))
    if fmt == "yolo":
        names = "".join(f"{c}\n" for c in classes)
        files = {"obj.names": names, os.path.join("obj_train_data", "classes.txt"): names,
                 "obj.data": f"classes = {len(classes)}\nnames = obj.names\ntrain = train.txt\n",
                 "train.txt": "".join(f"obj_train_data/{name}\n" for name, _, _ in items),
                 "data.yaml": "names:\n" + "".join(f"  {i}: {json.dumps(c)}\n" for i, c in enumerate(classes))}
        for path, text in files.items():
            write_text_atomic(text, os.path.join(root, "yolo", path))


def voc(name, record):
    """Pascal VOC XML of one image, as LabelImg writes it (folder, filename, size, objects with their bndbox)."""
    objects = "".join(
        f"\t<object>\n\t\t<name>{escape(label)}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        + "".join(f"\t\t\t<{k}>{v}</{k}>\n" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        + "\t\t</bndbox>\n\t</object>\n" for box, label in zip(record["boxes"], record["labels"]))
    return (f"<annotation>\n\t<folder></folder>\n\t<filename>{escape(name)}</filename>\n\t<source>\n\t\t<database>"
            f"detect.py</database>\n\t</source>\n\t<size>\n\t\t<width>{record['width']}</width>\n\t\t<height>"
            f"{record['height']}</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n{objects}"
            f"</annotation>\n")


def yolo(record, classes):
    """YOLO lines of one image: class index (from 0), centre and size in fractions of the image, exactly (repr)."""
    w, h = record["width"], record["height"]
    return "".join(f"{classes.index(label)} {(x0 + x1) / 2 / w!r} {(y0 + y1) / 2 / h!r} {(x1 - x0) / w!r} "
                   f"{(y1 - y0) / h!r}\n" for (x0, y0, x1, y1), label in zip(record["boxes"], record["labels"]))


def coco(items, classes):
    """One COCO detection file: images (id, file_name, width, height), annotations (bbox [x, y, w, h] in pixels),
    categories (id from 1, in the model's order)."""
    images, annotations = [], []
    for image_id, (name, _, record) in enumerate(items, 1):
        images.append({"id": image_id, "file_name": name, "width": record["width"], "height": record["height"]})
        for (x0, y0, x1, y1), label in zip(record["boxes"], record["labels"]):
            box = [x0, y0, round(x1 - x0, 6), round(y1 - y0, 6)]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id":
                                classes.index(label) + 1, "bbox": box, "area": round(box[2] * box[3], 6),
                                "iscrowd": 0, "segmentation": []})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": c, "supercategory": "cell"} for i, c in enumerate(classes, 1)]}
