//! A sysfs tree laid out as on a real host, for GPU passthrough tests: PCI functions under
//! `devices/pci0000:00/ADDR` with `vendor`, `device` and `class` files and `driver` and
//! `iommu_group` symlinks, and `bus/pci/devices/ADDR` symlinks into it.

use std::path::Path;

/// One NVIDIA PCI function (`id` the device ID, `0x2330`; `class` `0x030200` for a 3D
/// controller, `0x040300` for its audio function), bound to `driver` if any.
pub fn nvidia_function(sys: &Path, address: &str, id: &str, class: &str, driver: Option<&str>) {
    let dir = sys.join("devices/pci0000:00").join(address);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, value) in [("vendor", "0x10de"), ("device", id), ("class", class)] {
        std::fs::write(dir.join(file), format!("{value}\n")).unwrap();
    }
    if let Some(driver) = driver {
        std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{driver}"), dir.join("driver")).unwrap();
    }
    std::os::unix::fs::symlink("../../../kernel/iommu_groups/17", dir.join("iommu_group")).unwrap();
    // /sys/bus/pci/devices/ADDR is itself a symlink into /sys/devices.
    let bus = sys.join("bus/pci/devices");
    std::fs::create_dir_all(&bus).unwrap();
    std::os::unix::fs::symlink(format!("../../../devices/pci0000:00/{address}"), bus.join(address)).unwrap();
}

/// A GPU passed through to a VM: its 3D controller and audio function on `vfio-pci`.
pub fn passed_through_gpu(sys: &Path, bus: &str, id: &str) {
    nvidia_function(sys, &format!("0000:{bus}:00.0"), id, "0x030200", Some("vfio-pci"));
    nvidia_function(sys, &format!("0000:{bus}:00.1"), "0x22a3", "0x040300", Some("vfio-pci"));
}
