# Appliance image targets; included by the top-level Makefile (`include firmware-image/image.mk`).
#   make image-deps   install the Debian packages the image build and boot test need (idempotent, quiet)
#   make image        build/image/rampart.img (raw GPT), rampart.img.zst, rampart.qcow2, rampart-rootfs.sqfs
#   make image-test   boot the image under QEMU (TCG) + OVMF: first boot, WireGuard + /health, A/B update and
#                     rollback; closes with "image-test: N passed, M failed"
# See firmware-image/README.md for the layout and expected durations.

IMAGE_CARGO ?= $(or $(CARGO),cargo)
IMAGE_OUT   ?= $(CURDIR)/build/image
IMAGE_WORK  ?= $(CURDIR)/build/image-work
# The cargo target directory of the gateway the image ships (`make test` gives it its own, see the Makefile).
IMAGE_TARGET ?= $(CURDIR)/target

.PHONY: image image-deps image-test

image-deps:
	@$(CURDIR)/firmware-image/scripts/deps.sh

image: image-deps ui
	nice $(IMAGE_CARGO) build --release --target-dir $(IMAGE_TARGET)
	nice $(CURDIR)/firmware-image/scripts/build.sh --rampart $(IMAGE_TARGET)/release/rampart \
		--out $(IMAGE_OUT) --work $(IMAGE_WORK)

image-test: image
	IMAGE_TARGET=$(IMAGE_TARGET) $(CURDIR)/tests/image_test.sh $(IMAGE_OUT)
