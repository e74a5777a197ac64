"""The official label lists of the datasets, defined once for loaders, tasks and the synthetic generator.

They live here, beside the loaders and below everything else in the data layer (this module
imports nothing), so a loader never depends on the synthetic generator and the generator writes
exactly the names the loaders read. Spellings are the official files' own.
"""
from __future__ import annotations

#: The 14 CheXpert / MIMIC-CXR observations, in the alphabetical order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices",
)

#: The 5 CheXpert competition tasks (MGCA / GLoRIA CheXpert-5, CheXpert 5x200).
CHEXPERT_COMPETITION_TASKS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                               "Pleural Effusion")

#: The 14 NIH ChestX-ray14 labels (spelling of Data_Entry_2017.csv).
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)

#: COVIDx classes; the position is MGCA's class index (normal 0, pneumonia 1, COVID-19 2).
COVIDX_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
